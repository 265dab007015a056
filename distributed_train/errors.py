"""User mistakes (UsageError, exit 2) and known training failures: the CLI prints one line for each."""


class UsageError(Exception):
    """Bad configuration, bad task or bad environment: the message names the key and the fix."""


EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NONFINITE = 3  # train.nonfinite=error stopped a loss that became NaN/inf
EXIT_COMMUNICATION = 4  # a collective timed out, a peer left, or the rendezvous was unreachable


class TrainingFailure(Exception):
    """A failure during training with a known cause: one line on stderr and `exit_code`."""

    exit_code = 1
    every_rank = False  # print on every rank (the rank that saw it), not only rank 0


class NonFiniteLoss(TrainingFailure):
    """The loss became NaN or inf; the message names the step and the rank."""

    exit_code = EXIT_NONFINITE


class CommunicationFailure(TrainingFailure):
    """Ranks could not talk: timeout, lost peer or unreachable rendezvous; names ranks and operation."""

    exit_code = EXIT_COMMUNICATION
    every_rank = True


class PeerCrashed(CommunicationFailure):
    """A collective failed because another rank crashed: the job failed like that rank (exit 1)."""

    exit_code = 1
