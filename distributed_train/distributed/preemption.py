"""Stop cleanly on SIGTERM (what Kubernetes and torchrun send before they kill), on SIGHUP (a closed
terminal, a dropped ssh session: torchrun forwards it) and on Ctrl-C.

The handler only sets a flag: no I/O and no collectives inside a signal handler. A signal may
reach one rank only (one node of several, a `kill` of one process), and under NCCL the ranks'
hosts are not in lock-step, so each rank deciding alone would stop the ranks at different steps:
the one that enqueued one more all-reduce would then wait for peers that never join it. So the
ranks vote: every rank adds its ballot to an all-reduce launched at a step boundary and reads
the result at the next voting boundary: every rank reads the same numbers after the same
step and stops there. Reading a result that is a vote old never makes the host wait for the step
in flight (on CUDA the numbers come back through pinned memory behind an event). Each rank also
proposes the steps until the next vote (the agreed interval is the proposals' mean), so that a
vote happens about every VOTE_EVERY_S seconds: on every step of a GPU model, every few dozen steps
of a CPU model whose step takes a millisecond (where a vote per step would cost several percent).
The vote is a sum of counts, and every rank counts itself in it: a vote that an aborted NCCL group
left unreduced (TORCH_NCCL_ASYNC_ERROR_HANDLING=2 leaves the buffer without an error) is a
CommunicationFailure, not a stop nobody asked for or a missed one.

The first SIGINT (Ctrl-C) stops like SIGTERM, with exit code 130; a second one ends the process
at once. SIGHUP stops like SIGTERM too, with exit code 129.

A stop signal that a worker sends to itself is task code's, not a scheduler's: it never arrives
(`errors.refuse_signals_to_self`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

from distributed_train.errors import STOP_SIGNALS

# The agreed stop is the largest code any rank voted, so SIGTERM (a scheduler's stop) beats a
# hang-up and Ctrl-C when several arrive.
_SIGNAL_CODE = {signal.SIGINT: 1, signal.SIGHUP: 2, signal.SIGTERM: 3}
_CODE_SIGNAL = {code: signum for signum, code in _SIGNAL_CODE.items()}


class Preempted(Exception):
    """Raised at a step boundary after a stop signal; carries the step and the signal."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.step, self.signum = step, signum

    @property
    def exit_code(self) -> int:
        """128 + the signal: 143 for SIGTERM, 129 for SIGHUP, 130 for SIGINT, as a shell reports them."""
        return 128 + self.signum


VOTE_EVERY_S = 0.05  # seconds between votes; a stop is taken within about two of them


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One CUDA stream per device for the votes' waits and copies."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _PendingVote:
    """One vote, all-reduced as a sum of counts: the ranks stopping for each signal, the proposed
    intervals, the ranks whose clock says a checkpoint is due, and the ranks that voted (every one);
    readable without waiting for later work (on CUDA through pinned memory)."""

    def __init__(self, stop_code: int, next_interval: int, save_due: bool, device: torch.device):
        import torch.distributed as torch_dist
        self.world_size = torch_dist.get_world_size()
        ballot = [int(stop_code == code) for code in sorted(_CODE_SIGNAL)]
        values = [*ballot, next_interval, int(save_due), 1]
        # Filled on the device: a copy from pageable host memory would wait for the GPU's stream.
        self.vote = torch.zeros((len(values),), dtype=torch.int64, device=device)
        for i, value in enumerate(values):
            if value:
                self.vote[i].fill_(value)
        self.work = _all_reduce_async(self.vote)
        self.host, self.event = self.vote, None
        if device.type == "cuda":
            # On a side stream: it waits for the all-reduce and copies the result to pinned host
            # memory; the compute stream (the next steps) and the host wait for neither.
            side = _side_stream(device)
            with torch.cuda.stream(side):
                self.work.wait()
                self.host = torch.empty((len(values),), dtype=torch.int64, pin_memory=True)
                self.host.copy_(self.vote, non_blocking=True)
                self.vote.record_stream(side)  # its memory is not reused before the copy ran
                self.event = torch.cuda.Event()
                self.event.record(side)

    def wait(self) -> None:
        """Until this vote's all-reduce is done (and its copy to the host)."""
        if self.event is not None:
            self.event.synchronize()
        else:
            self.work.wait()

    def result(self) -> tuple[int, int, bool]:
        """The largest stop code any rank voted (0: none), the agreed steps to the next vote, and
        whether a save is due (waits for this vote only); a vote that not every rank is counted in
        is a CommunicationFailure."""
        from distributed_train.distributed.group import corrupt_reduction

        self.wait()
        *ballot, interval_sum, due, counted = self.host.tolist()
        if counted != self.world_size:
            raise corrupt_reduction("stop vote", counted, self.world_size)
        code = max((code for code, votes in zip(sorted(_CODE_SIGNAL), ballot) if votes), default=0)
        return code, max(1, -(-interval_sum // counted)), due > 0


def _all_reduce_async(vote: torch.Tensor):
    """The vote's sum over every rank, launched: the Work to wait on."""
    import torch.distributed as torch_dist
    return torch_dist.all_reduce(vote, op=torch_dist.ReduceOp.SUM, async_op=True)


class StopFlag:
    """Context manager that turns SIGTERM/SIGINT into a stop every rank takes after the same step."""

    def __init__(self, enabled: bool = True, device: torch.device | None = None):
        self.enabled = enabled
        self.device = device or torch.device("cpu")
        self.signum: int | None = None  # the first stop signal this process received
        self.signal_time: float | None = None  # time.monotonic() when it arrived
        self.agreed_signum: int | None = None  # the signal every rank stops for, once agreed
        self._pending: _PendingVote | None = None
        self._next_vote_step = 0  # the boundary where the pending vote is read and the next launched
        self._vote_started: tuple[int, float] = (0, 0.0)  # (step, time) of the last vote
        self._previous: dict[int, object] = {}
        self.save_agreed = False  # a vote agreed a checkpoint is due by time: saved after the next step

    @property
    def requested(self) -> bool:
        """This rank received a stop signal (or agreed to a peer's)."""
        return self.signum is not None or self.agreed_signum is not None

    @property
    def stop_signum(self) -> int:
        """The signal the run stops for: the agreed one, else this rank's own (SIGTERM if none)."""
        return self.agreed_signum or self.signum or signal.SIGTERM

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            os.write(2, b"dtrain: second Ctrl-C: stopping now, without a checkpoint\n")
            os._exit(128 + signal.SIGINT)
        if self.signum is None or _SIGNAL_CODE[signum] > _SIGNAL_CODE[self.signum]:
            self.signum = signum
        if self.signal_time is None:
            self.signal_time = time.monotonic()

    def should_stop(self, step: int, save_due: bool | None = None) -> bool:
        """Called by every rank at every step boundary: True on all ranks after the same step.
        `save_due` (None when checkpoints are not timed: the same on every rank): this rank's clock
        says a timed checkpoint is due; once a vote agrees, `take_save()` is True on every rank
        after the same step."""
        if not self.enabled and save_due is None:
            return False
        if not _group_active():
            self.agreed_signum = self.signum
            self.save_agreed = self.save_agreed or bool(save_due)
            return self.signum is not None
        if step < self._next_vote_step:
            return False  # the cheap path: most steps of a fast model
        code, interval, due = self._pending.result() if self._pending is not None else (0, 1, False)
        self.save_agreed = self.save_agreed or due
        if code:
            self._pending = None
            self.agreed_signum = _CODE_SIGNAL[code]
            return True
        self._pending = _PendingVote(_SIGNAL_CODE.get(self.signum, 0), self._propose_interval(step),
                                     bool(save_due), self.device)
        self._next_vote_step = step + interval
        return False

    def take_save(self) -> bool:
        """Whether a vote agreed a time-based checkpoint is due (then cleared): the same answer on
        every rank after the same step."""
        agreed, self.save_agreed = self.save_agreed, False
        return agreed

    def _propose_interval(self, step: int) -> int:
        """Steps that take about VOTE_EVERY_S at this rank's pace since the last vote."""
        now = time.perf_counter()
        last_step, last_time = self._vote_started
        self._vote_started = (step, now)
        if step <= last_step or not last_time:
            return 1
        step_s = (now - last_time) / (step - last_step)
        return max(1, min(1000, int(VOTE_EVERY_S / step_s))) if step_s > 0 else 1000

    def after_commit(self) -> None:
        """Every rank waits until rank 0 committed the stop checkpoint, so none exits earlier (and
        makes torchrun tear the group down while rank 0 still writes). Best effort: a peer that
        has gone makes the barrier fail, and the stop goes on."""
        if self.agreed_signum is None or not _group_active():
            return
        from distributed_train.distributed import diagnose

        # A large checkpoint may take longer than dist.timeout_s: the stuck-rank watchdog waits.
        diagnose.at("waiting for rank 0 to commit the stop checkpoint", may_take_long=True)
        try:
            import torch.distributed as torch_dist
            torch_dist.barrier()
        except Exception:  # noqa: BLE001 - the checkpoint is committed or not; exiting is right either way
            pass

    def __enter__(self) -> "StopFlag":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        # The vote launched after the last step: gloo must be done with its tensor long before the
        # process group is destroyed. A gloo thread that drops the last reference to a tensor made in
        # Python needs the GIL, and the group's destructor holds the GIL while it joins those threads:
        # a deadlock (seen when one process runs several jobs). After a failure the vote may never
        # complete: it is kept alive instead, so no gloo thread ever frees it.
        if self._pending is not None:
            if exc_type is None:
                self._pending.wait()
            else:
                _UNFINISHED_VOTES.append(self._pending)
        self._pending = None


_UNFINISHED_VOTES: list = []  # votes abandoned after a failure (a few bytes each; the process ends)


def _group_active() -> bool:
    """A process group with more than one rank exists (else a rank decides alone)."""
    import torch.distributed as torch_dist
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def print_stop(exc: Preempted, committed: bool) -> None:
    """The one line a stopped run prints; 'rerun' only when there is a checkpoint to resume from."""
    resume = "; rerun the same command to continue" if committed else " (no checkpoint to resume from)"
    print(f"dtrain: {exc}{resume}", file=sys.stderr, flush=True)
