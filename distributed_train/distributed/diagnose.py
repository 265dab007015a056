"""Why a distributed job failed or hangs, in one line: which rank, which operation, and the fix.

Every rank's main thread records where it is (`at("task.loss()")`: two attribute writes, no I/O).
A daemon thread publishes that position to the rendezvous store once a second. When a collective
times out or loses a peer, the rank that noticed reads every rank's position and names the ranks
that did not arrive. The same thread ends a rank that SIGTERM asked to stop but that stays stuck
(in user code, say) for longer than `dist.timeout_s`, so the job ends instead of waiting for SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as torch_dist

from distributed_train.errors import (
    EXIT_COMMUNICATION,
    CommunicationFailure,
    PeerCrashed,
    SignalToItself,
    TrainingFailure,
    UsageError,
)
from distributed_train.task import base_exception, exited, not_from_the_user

STORE_PREFIX = "dtrain/heartbeat/"
BEAT_S = 1.0
# The setting that bounds collectives, as messages name it (`dtrain doctor` calls it --timeout-s).
TIMEOUT_SETTING = "dist.timeout_s"
STALE_S = 5.0  # a rank silent this long has died or is stuck holding the GIL

SHM_ALLREDUCE_SIGN = "shared-memory all-reduce"  # in every error of shm_allreduce's waits
# Substrings of gloo/NCCL/store errors that mean "the ranks could not talk", not "the task is wrong".
_COMMUNICATION_SIGNS = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                        "Connection refused", "connectFullMesh", "NCCL error", "Broken pipe",
                        SHM_ALLREDUCE_SIGN,
                        # NCCL (TORCH_NCCL_ASYNC_ERROR_HANDLING=2): the watchdog aborted the communicator
                        "Watchdog caught collective operation timeout", "communicator was aborted",
                        "ncclRemoteError", "ncclSystemError", "ncclInternalError", "NCCL communicator")


@dataclass
class Position:
    """Where this rank's main thread is: the step it works on, the phase, and since when."""

    step: int = 0
    phase: str = "starting"
    since: float = 0.0  # time.monotonic() when the phase began
    may_take_long: bool = False  # the SIGTERM watchdog leaves this phase alone (a checkpoint write)


position = Position(since=time.monotonic())


def at(phase: str, step: int | None = None, may_take_long: bool = False) -> None:
    """Record that the main thread now does `phase` (cheap enough for the hot loop)."""
    if step is not None:
        position.step = step
    position.phase, position.since, position.may_take_long = phase, time.monotonic(), may_take_long


@contextlib.contextmanager
def collective(op: str, caller_depth: int = 3) -> Iterator[None]:
    """Phase `op in caller()` while a collective runs; on failure the phase stays, naming it."""
    previous = (position.phase, position.since)
    at(f"{op} in {sys._getframe(caller_depth).f_code.co_name}()")
    yield
    position.phase, position.since = previous


def _default_store() -> Any:
    try:
        return torch_dist.distributed_c10d._get_default_store() if torch_dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - a private API; without it there is just no heartbeat
        return None


def _store_answers(store: Any) -> bool:
    """Whether the server of a TCP store (rank 0's, or torchrun's agent's) still takes connections,
    asked on a connection of our own: asking a gone one through the store prints c10d's warning
    with a C++ stack trace for every call, under the one line a failed rank prints."""
    while hasattr(store, "underlying_store"):  # a PrefixStore
        store = store.underlying_store
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    if not host or not port:
        return True  # not a TCP store: ask it
    try:
        with socket.create_connection((host, port), timeout=BEAT_S):
            return True
    except OSError:
        return False


class Heartbeat:
    """Publishes this rank's position every second; ends a rank stuck after SIGTERM."""

    def __init__(self, rank: int, world_size: int, grace_s: float):
        self.rank, self.world_size, self.grace_s = rank, world_size, grace_s
        self.stop_requested: Callable[[], bool] = lambda: False  # set by watch()
        self.store = _default_store() if world_size > 1 else None
        self._done = threading.Event()
        self._stop_seen: float | None = None
        self.identity = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self) -> "Heartbeat":
        self._thread = threading.Thread(target=self._run, name="dtrain-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._done.set()
        self._thread.join(timeout=5 * BEAT_S)  # not mid-way through a store call when the process exits
        if exc is not None:  # tell the peers why this rank left, before it exits
            self.publish(left=describe(exc)[:300])

    def watch(self, stop_requested: Callable[[], bool]) -> None:
        """End this rank if it stays stuck for grace_s after `stop_requested()` (SIGTERM) turns true."""
        self.stop_requested = stop_requested

    def publish(self, left: str | None = None) -> None:
        if self.store is None or (left is not None and not _store_answers(self.store)):
            return  # (leaving: after a failure, the store's host may be gone)
        beat = {**self.identity, "step": position.step, "phase": position.phase, "left": left,
                "phase_s": time.monotonic() - position.since, "time": time.time()}
        try:
            self.store.set(STORE_PREFIX + str(self.rank), json.dumps(beat))
        except Exception:  # noqa: BLE001 - the store host is gone; the collective will say so
            self.store = None

    def _run(self) -> None:
        # Beat at once, then every BEAT_S: a rank that dies or stops in its first second is still
        # known (host, pid), so its peers can tell dead, stopped and slow apart.
        while True:
            if not self.stop_requested():  # after SIGTERM the store's host may be gone already
                self.publish()
            self._end_if_stuck()
            if self._done.wait(BEAT_S):
                return

    def _end_if_stuck(self) -> None:
        """After SIGTERM a healthy rank reaches a step boundary soon; one that does not is stuck."""
        now = time.monotonic()
        if not self.stop_requested():
            return
        self._stop_seen = self._stop_seen or now
        stuck = now - max(self._stop_seen, position.since)
        if stuck > self.grace_s and not position.may_take_long:
            print(f"dtrain: error: rank {self.rank}: stopped by SIGTERM but stuck in {position.phase} of "
                  f"step {position.step} for {stuck:.0f} s (> {TIMEOUT_SETTING}); exiting without a "
                  "checkpoint", file=sys.stderr, flush=True)
            os._exit(EXIT_COMMUNICATION)


def read_positions(world_size: int) -> dict[int, dict] | None:
    """Every rank's last heartbeat that the store holds (rank -> beat); None if it is unreachable."""
    store, beats = _default_store(), {}
    if store is None or not _store_answers(store):
        return None
    for rank in range(world_size):
        key = STORE_PREFIX + str(rank)
        try:
            if store.check([key]):
                beats[rank] = json.loads(store.get(key))
        except Exception:  # noqa: BLE001 - the store's host (rank 0 or the agent) is gone
            return None
    return beats


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without gloo's source path prefix."""
    text = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if text.startswith("[") and "] " in text:  # "[/path/gloo/pair.cc:553] Connection closed ..."
        text = text.split("] ", 1)[1]
    return text.strip()


def describe(exc: BaseException) -> str:
    """`Type: first line of the message` (just the type when the message is empty)."""
    text = first_line(exc)
    return type(exc).__name__ if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def is_communication_failure(exc: BaseException) -> bool:
    """True for errors of the process group or the store, as opposed to errors in task code."""
    if isinstance(exc, TrainingFailure):
        return False
    return isinstance(exc, torch_dist.DistError) or (
        isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _COMMUNICATION_SIGNS))


def process_state(host: str, pid: int) -> str | None:
    """A local process's state: "dead", "stopped" (SIGSTOP, Ctrl-Z) or "running"; None when it runs
    on another host (nothing to check from here)."""
    if host != socket.gethostname():
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "dead"
    return {"Z": "dead", "X": "dead", "T": "stopped"}.get(state, "running")


def _end_stopped_peer(pid: int) -> bool:
    """SIGKILL a stopped peer of this job: the job is failing, and a stopped process would hold
    torchrun's shutdown for its whole grace period (it cannot act on the SIGTERM it gets).

    torchrun answers the peer's death by SIGTERMing this rank, which is already on its way out
    with the diagnosis: ignore that, so the diagnosis is printed and the exit code is ours."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        pass
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


def _describe_peer(rank: int, beat: dict | None, mine: tuple[int, str], timeout_s: float) -> str | None:
    """Why peer `rank` is not where this rank is, or None when it is in the same operation.

    The heartbeat thread of a rank stuck in a CUDA call or a deadlock keeps beating, so a rank
    whose main thread has stayed in one phase for longer than dist.timeout_s is called stuck."""
    if beat is None:
        return f"rank {rank} never reported (it did not start or could not reach the store)"
    where = f"{beat['phase']} of step {beat['step']}"
    who = f"pid {beat['pid']} on {beat['host']}"
    if beat.get("left"):
        return f"rank {rank} left the job in {where} ({beat['left']})"
    state = process_state(beat["host"], beat["pid"])
    if state == "dead":
        # Its last beat may be up to BEAT_S old: a fast run has moved on since, so say when it was.
        seen = f"last seen {time.time() - beat['time']:.1f} s earlier in {where}"
        return f"rank {rank} died, {seen} ({who} is gone: killed, e.g. by the OOM killer or kill -9)"
    if state == "stopped":
        ended = "; ended it with SIGKILL" if _end_stopped_peer(beat["pid"]) else ""
        return f"rank {rank} is stopped in {where} ({who}: SIGSTOP or Ctrl-Z{ended})"
    silent = time.time() - beat["time"]
    if silent > STALE_S:
        return f"rank {rank} stopped responding {silent:.0f} s ago in {where} ({who}: dead or stuck)"
    in_phase = beat["phase_s"] + silent
    if (beat["step"], beat["phase"]) != mine and in_phase > timeout_s:
        return (f"rank {rank} is stuck: its main thread has been in {where} for {in_phase:.0f} s "
                f"(> {TIMEOUT_SETTING}) although its process still answers ({who}; a hung CUDA call or a "
                "deadlock)")
    if (beat["step"], beat["phase"]) != mine:
        return f"rank {rank} did not arrive: it is in {where} for {in_phase:.0f} s ({who})"
    return None


def explain_communication_failure(exc: BaseException, rank: int, world_size: int,
                                  timeout_s: float) -> CommunicationFailure | None:
    """One line naming the operation and the ranks that did not arrive, or None if not a comm error."""
    if not is_communication_failure(exc):
        return None
    mine = (position.step, position.phase)
    beats = read_positions(world_size)
    peers = [_describe_peer(r, beats.get(r), mine, timeout_s) for r in range(world_size)
             if r != rank and beats is not None]
    peers = [p for p in peers if p]
    crashed = [p for p in peers if " died, last seen " in p]
    stopped = [p for p in peers if " is stopped in " in p]
    timed_out = "Timed out" in str(exc) or "timeout" in str(exc).lower()
    what = f"timed out after {TIMEOUT_SETTING}={timeout_s:g} s" if timed_out else "failed"
    if beats is None:
        cause = "the rendezvous store is gone too, so rank 0 (or its node) has exited: see its error"
    elif not peers:
        cause = ("every rank reached it: the network failed or the ranks called different collectives "
                 "(rerun with TORCH_DISTRIBUTED_DEBUG=DETAIL to compare them)")
    elif any("left the job" in p for p in peers):
        cause = "; ".join(peers) + ": see that rank's own error"
    elif crashed or stopped:
        cause = "; ".join(peers) + (": see the launcher's report of its exit" if crashed else "")
    elif not timed_out:  # the peer closed its connection: it ended (or is ending), it is not slow
        cause = "; ".join(peers) + ", and closed its connection: it ended or is ending (see its own error or the " \
            "launcher's report of its exit)"
    else:
        cause = "; ".join(peers) + (": find out why it is slow (py-spy dump --pid PID), or raise "
                                    f"{TIMEOUT_SETTING} if it is legitimately slow")
    detail = first_line(exc).split(". ")[0]  # gloo adds "This is typically caused by ..."
    # A peer that crashed is the cause, not the network: exit like it did, whichever rank ends first.
    kind = PeerCrashed if crashed or any("left the job" in p for p in peers) else CommunicationFailure
    return kind(f"rank {rank}: {mine[1]} of step {mine[0]} {what} ({detail}): {cause}")


def unused_parameters_message(names: list[str], step: int | None = None, rank: int | None = None,
                              last_micro_batch: bool = False) -> str:
    """The one line for DDP's 'Expected to have finished reduction' mistake (`last_micro_batch`: with
    accumulation, DDP reduces the last micro-batch's backward only, so each parameter needs one there)."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    where = "the first step" if step in (None, 1) else f"step {step}"
    if last_micro_batch:
        where = f"the last micro-batch of {where} (the one DDP reduces)"
    on = f" on rank {rank}" if rank is not None else ""
    return (f"the model has parameters that got no gradient in {where}{on} ({shown}); DDP needs "
            "--ddp.find_unused_parameters=true for that (it costs a graph walk per step), or remove "
            "those parameters from the model or freeze them (requires_grad=False)")


def explain_step_error(exc: BaseException, first_step: bool) -> Exception | None:
    """A one-line UsageError for a mistake in task code or data, or None to keep the traceback.

    Errors on the first step of a run are the task's (nothing has worked yet); later ones are
    explained only when their cause is certain, since a crash mid-run may be a real bug. Running
    out of memory is the machine's limit, not a mistake: exit 1, which a scheduler may retry."""
    if isinstance(exc, (UsageError, TrainingFailure)) or is_communication_failure(exc):
        return None
    text = first_line(exc)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return TrainingFailure(
            f"out of memory in {position.phase} at step {position.step} ({type(exc).__name__}"
            f"{': ' + text if str(exc).strip() else ''}); lower train.batch_size or set "
            "train.micro_batch_size, or give each rank more memory (dtrain estimate TASK sizes a run)")
    if isinstance(exc, SignalToItself):  # certain at any step: task code signalled its own process
        return UsageError(f"{position.phase} at step {position.step} raised SignalToItself: {text}")
    if "Expected to have finished reduction" in str(exc):
        return UsageError("the model has parameters that got no gradient in a step; DDP needs "
                          "--ddp.find_unused_parameters=true for that, or remove those parameters")
    if "default_collate" in text or "batch must contain" in text:
        return UsageError(f"a training batch cannot be built: {text}; make train_dataset()[i] return "
                          "tensors, numbers or numpy arrays (or tuples/dicts of them), or give the task "
                          "a collate(samples) method")
    if _compiler_failed(exc):  # Inductor or Triton, not the task: exit 1, as any failure of the machinery
        return TrainingFailure(f"torch.compile failed in {position.phase} at step {position.step} "
                               f"({type(exc).__name__}: {text}); train without it (train.compile=false), or see "
                               "dtrain train --debug for the compiler's traceback")
    if not first_step:
        return None
    phase = position.phase if position.phase != "loading batch" else "loading the first batch " \
        "(train_dataset()[i] or collate)"
    return UsageError(f"{phase} failed on the first step with {type(exc).__name__}: {text}; fix the "
                      "task (dtrain train --debug shows the traceback)")


def _compiler_failed(exc: BaseException) -> bool:
    """The compiler behind torch.compile failed (Dynamo's BackendCompilerFailed, an Inductor or
    Triton error), here or in a cause of it."""
    seen, chain = exc, 0
    while seen is not None and chain < 20:
        kind = type(seen)
        if kind.__name__ in ("BackendCompilerFailed", "InductorError") or \
                kind.__module__.startswith(("triton", "torch._inductor")):
            return True
        seen, chain = seen.__cause__ or seen.__context__, chain + 1
    return False


@contextlib.contextmanager
def task_errors_explained(first_step: bool) -> Iterator[None]:
    """Re-raise a task or data mistake inside the block as a one-line UsageError."""
    try:
        yield
    except Exception as exc:
        explained = explain_step_error(exc, first_step)
        if explained is None:
            raise
        raise explained from exc
    except (SystemExit, KeyboardInterrupt) as exc:  # from task code: a task failure, never exit 0 or 130
        if not_from_the_user(exc):
            raise
        where = f"{position.phase} at step {position.step}"
        raise (exited(where, exc) if isinstance(exc, SystemExit) else base_exception(where, exc)) from None


@contextlib.contextmanager
def communication_failures_explained(rank: int, world_size: int, timeout_s: float) -> Iterator[None]:
    """Re-raise a failed collective inside the block as a CommunicationFailure naming the ranks."""
    try:
        yield
    except Exception as exc:
        explained = explain_communication_failure(exc, rank, world_size, timeout_s)
        if explained is None:
            raise
        raise explained from exc


def explain_join_failure(exc: BaseException, rank: int, world_size: int, address: str,
                         timeout_s: float) -> CommunicationFailure:
    """init_process_group could not reach the other ranks or the store."""
    return CommunicationFailure(
        f"rank {rank} of {world_size} could not join the process group at {address} within "
        f"{TIMEOUT_SETTING}={timeout_s:g} s ({describe(exc)}): check that rank 0 "
        "(or the torchrun agent) runs there, the port is open, and every rank has the same WORLD_SIZE")


def nonfinite_vector(losses: list[torch.Tensor], rank: int, world_size: int,
                     device: torch.device) -> torch.Tensor:
    """[sum and count of finite losses, first non-finite index (1-based, 0 = none) of rank 0..W-1]."""
    vector = torch.zeros(2 + world_size, dtype=torch.float64, device=device)
    if losses:
        stacked = torch.stack(losses).double()
        bad = ~torch.isfinite(stacked)
        index = torch.arange(1, len(losses) + 1, device=device, dtype=torch.float64)
        first = torch.where(bad, index, torch.full_like(index, float("inf"))).min()
        # train.nonfinite=skip logs the mean of the finite losses; `error` stops on the first other.
        vector[0], vector[1] = torch.where(bad, 0.0, stacked).sum(), (~bad).sum()
        vector[2 + rank] = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
    return vector


def nonfinite_problem(values: list[float], first_step: int) -> str | None:
    """After the all-reduce of `nonfinite_vector` (read on the host: `values`): the message naming
    the earliest bad step and rank."""
    firsts = values[2:]
    bad = {rank: int(i) for rank, i in enumerate(firsts) if i > 0}
    if not bad:
        return None
    earliest = min(bad.values())
    ranks = ", ".join(str(r) for r, i in bad.items() if i == earliest)
    return (f"non-finite loss (NaN or inf) at step {first_step + earliest - 1} on rank {ranks}; no "
            "checkpoint of this state was committed; lower train.lr, set train.grad_clip, check the "
            "data, or set train.nonfinite=skip to skip such steps")
