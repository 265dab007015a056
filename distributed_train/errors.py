"""Exit codes, the exceptions that map to them, and `user_errors()`, which does the mapping.

Exit codes: 0 done, 2 bad configuration or input (one line on stderr), 3 non-finite loss,
4 ranks could not talk (timeout, lost peer, rendezvous), 143 / 129 / 130 stopped by SIGTERM /
SIGHUP / Ctrl-C after a checkpoint, 1 anything else.
Exceptions are matched by type, never by their text.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Iterator


class UsageError(Exception):
    """Bad configuration, bad task or bad environment: the message names the key and the fix."""


EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NONFINITE = 3  # train.nonfinite=error stopped a loss that became NaN/inf
EXIT_COMMUNICATION = 4  # a collective timed out, a peer left, or the rendezvous was unreachable
EXIT_PREEMPTED = 128 + signal.SIGTERM  # stopped by SIGTERM after committing a checkpoint
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # each ends in a committed stop


class TrainingFailure(Exception):
    """A failure during training with a known cause: one line on stderr and `exit_code`."""

    exit_code = 1
    every_rank = False  # print on every rank (the rank that saw it), not only rank 0


class NonFiniteLoss(TrainingFailure):
    """The loss became NaN or inf; the message names the step and the rank."""

    exit_code = EXIT_NONFINITE


class DataWorkerLost(TrainingFailure):
    """A DataLoader worker process of this rank died (killed by a signal, or exited): names which
    and how; printed by the rank that lost it."""

    every_rank = True


class CommunicationFailure(TrainingFailure):
    """Ranks could not talk: timeout, lost peer or unreachable rendezvous; names ranks and operation."""

    exit_code = EXIT_COMMUNICATION
    every_rank = True


class PeerCrashed(CommunicationFailure):
    """A collective failed because another rank crashed: the job failed like that rank (exit 1)."""

    exit_code = 1


def print_error(message: str, after_peer: bool = False) -> None:
    """The one line a user sees for a known failure (under torchrun also left for the launcher);
    `after_peer`: this rank failed because another one left (not the first failure, whenever seen)."""
    print(f"dtrain: error: {message}", file=sys.stderr, flush=True)
    record_failure(message, after_peer=after_peer)


# torchrun gives each worker a file for its failure (the agent reads it when the worker fails).
ERROR_FILE_VAR = "TORCHELASTIC_ERROR_FILE"


def record_failure(message: str, printed: bool = True, after_peer: bool = False) -> None:
    """Leave this worker's first one-line explanation in its torchrun error file, with the time to
    the microsecond, so that `dtrain launch` can end with the line of the rank that failed first
    (after several ranks failed, the last line printed is otherwise whichever came last), and can
    print it when this rank did not (a usage error is printed by rank 0 only: a mistake in the
    configuration is the same on every rank, but one found in a step may be this rank's alone)."""
    path = os.environ.get(ERROR_FILE_VAR)
    if not path or os.path.exists(path):
        return
    now = time.time()
    try:
        with open(path, "x") as f:
            json.dump({"message": message, "timestamp": int(now),
                       "dtrain": {"time": now, "printed": printed, "after_peer": after_peer}}, f)
    except OSError:
        pass  # best effort: the line above was printed


@contextlib.contextmanager
def user_errors(debug: bool, quiet: bool = False) -> Iterator[None]:
    """Turn UsageError into one line on stderr and exit code 2 (`--debug` keeps the traceback);
    a known TrainingFailure (non-finite loss, hang) into one line and its own exit code."""
    try:
        yield
    except UsageError as exc:
        if debug:
            raise
        if not quiet:
            print_error(str(exc))
        else:
            record_failure(str(exc), printed=False)
        raise SystemExit(EXIT_USAGE) from None
    except TrainingFailure as exc:
        if debug:
            raise
        if not quiet or exc.every_rank:
            print_error(str(exc), after_peer=isinstance(exc, PeerCrashed))
        else:  # its time still tells the launcher which rank failed first (torchrun's: whole seconds)
            record_failure(str(exc), printed=False, after_peer=isinstance(exc, PeerCrashed))
        raise SystemExit(exc.exit_code) from None


_sigints = 0  # Ctrl-Cs (SIGINT) this process received outside training


def _count_sigint(signum, frame) -> None:  # noqa: ARG001
    global _sigints
    _sigints += 1
    raise KeyboardInterrupt


def count_sigints() -> None:
    """Ctrl-C raises KeyboardInterrupt as before, and is counted: a KeyboardInterrupt without one
    was raised by code (a task's), which is a task failure, not a user's stop."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _count_sigint)


def sigint_received() -> bool:
    return _sigints > 0


class SignalToItself(RuntimeError):
    """Task code tried to send a stop signal to its own process; the signal was not sent.

    A stop signal is a scheduler's or a user's (committed, exit 143/129/130, which a retry policy
    reads as a preemption); one that task code sends itself is a task failure: raised where it was
    sent, it is named like any error of the task method (exit 2)."""


_refusing = False  # armed by refuse_signals_to_self() for the worker's lifetime
_hook_installed = False


def _own_target(event: str, args: tuple) -> bool:
    """The audited call would signal this process: its pid, its process group, one of its threads."""
    if event == "signal.pthread_kill":
        return True  # a thread id names a thread of this process
    target = args[0]
    if event == "os.killpg":
        return target in (0, os.getpgrp())
    return target in (os.getpid(), 0, -1, -os.getpgrp())


def _refuse(call: str, signum: int) -> None:
    name = signal.Signals(signum).name
    raise SignalToItself(f"{call} would send {name} to its own process (not sent); a task cannot stop "
                         "the job with a signal, which would commit and exit as if a scheduler had "
                         "stopped it: raise an exception to fail it")


def _audit(event: str, args: tuple) -> None:
    # os.kill, os.killpg and signal.pthread_kill raise audit events; raising here aborts the call.
    if _refusing and event in ("os.kill", "os.killpg", "signal.pthread_kill") and args[1] in STOP_SIGNALS \
            and _own_target(event, args):
        _refuse(f"{event}()", args[1])


def _raise_signal(signum) -> None:  # signal.raise_signal has no audit event: this replaces it while armed
    if _refusing and signum in STOP_SIGNALS:
        _refuse("signal.raise_signal()", signum)
    _original_raise_signal(signum)


_original_raise_signal = signal.raise_signal


def refuse_signals_to_self(refuse: bool = True) -> None:
    """From now on (until called with False), a stop signal this process sends itself through
    Python raises SignalToItself in the sender instead. A signal from any other process (kill,
    torchrun, the kubelet, a `kill` command run by task code) is a stop as before."""
    global _refusing, _hook_installed
    if not _hook_installed:  # an audit hook cannot be removed: it is installed once and disarmed
        sys.addaudithook(_audit)
        _hook_installed = True
    _refusing = refuse
    signal.raise_signal = _raise_signal if refuse else _original_raise_signal
