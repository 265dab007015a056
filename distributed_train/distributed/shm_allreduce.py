"""DDP's gradient all-reduce through shared memory, for CPU ranks that all run on one host.

Gloo sends each gradient bucket through TCP loopback and hands it between three threads per rank
(caller, gloo worker, socket loop); on a small model that costs more than the model's whole
forward and backward (digits MLP, 2 ranks: ~1.5 ms of a 2.5 ms step, and two ranks were slower
than one process). Here, per bucket (in slot-sized pieces):

1. every rank writes its piece, divided by the world size as DDP does, into its own slot of a
   /dev/shm file and publishes a sequence number; once every rank has published it,
2. rank r adds up its 1/world_size share of every slot, in rank order, into the result area and
   publishes again (a reduce-scatter: each rank reads about one piece, whatever the world size);
3. every rank copies the whole result into its bucket.

Every element is summed once, in rank order, so all ranks hold bitwise the same gradients; with
two ranks they equal gloo's (a + b == b + a). Slots and results come in two sets used
alternately, so two barriers per piece are enough: a rank can only overwrite a set after every
rank has arrived at the next piece's first barrier, which each does after its last read.
"""

from __future__ import annotations

import errno
import os
import platform
import threading
import time
import uuid
import weakref

import numpy as np
import torch

from distributed_train import distributed
from distributed_train.distributed import DistEnv
from distributed_train.distributed.diagnose import SHM_ALLREDUCE_SIGN
from distributed_train.errors import UsageError

SHM_DIR = "/dev/shm"
LINE = 64  # bytes: each rank's sequence number sits on its own cache line
MAX_SLOT_BYTES = 4 * 2**20
SHM_BUDGET_BYTES = 32 * 2**20  # Docker's default /dev/shm is 64 MiB: leave room for DataLoader workers
SPIN_ITERATIONS = 200  # busy checks before yielding the core (a peer usually arrives within microseconds)
LIVENESS_EVERY_S = 0.02  # how often a waiting rank checks that the late ranks' processes still exist
# A rank that leaves the job with an error publishes -(its last sequence number + 1): peers fail
# at once, yet a peer still finishing a barrier this rank did reach does not see a false failure.
# Words in every error this module raises, so diagnose.is_communication_failure recognises them
# (autograd re-raises an exception from a DDP comm hook as a plain RuntimeError with the same text).
ERROR_SIGN = SHM_ALLREDUCE_SIGN


def unsupported_reason(env: DistEnv, device: torch.device) -> str | None:
    """Why the shared-memory all-reduce cannot serve this job (the same answer on every rank), or None."""
    if device.type != "cpu":
        return f"the gradients live on {device.type}, whose backend already reduces them on the device"
    if env.local_world_size != env.world_size:
        return (f"the job spans more than one host ({env.local_world_size} of {env.world_size} ranks "
                "run here)")
    if platform.system() != "Linux" or not os.path.isdir(SHM_DIR):
        return f"it needs Linux with {SHM_DIR}"
    # Its ordering argument (data stores become visible before the sequence number) is x86's TSO.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is only validated on x86_64 (this is {platform.machine()})"
    return None


def slot_bytes_for(total_bytes: int, world_size: int) -> int:
    """Bytes of one rank's slot: the whole model when it fits the budget, else a bounded piece."""
    budget = max(LINE * 1024, min(MAX_SLOT_BYTES, SHM_BUDGET_BYTES // (2 * (world_size + 1)))) // LINE * LINE
    return min(_round_up(max(total_bytes, LINE)), budget)


def _round_up(n: int) -> int:
    return -(-n // LINE) * LINE


def _alive(pid: int) -> bool:
    """False once process `pid` has exited (a zombie not yet reaped by its agent counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def file_bytes(world_size: int, slot_bytes: int) -> int:
    """Size of the shared file: two sets of (one slot per rank + a result), sequence numbers, a token."""
    return 2 * (world_size + 1) * slot_bytes + (world_size + 1) * LINE


class SharedMemoryAllReduce:
    """One job's shared slots; `hook` is the DDP comm hook, `all_reduce_mean_` the reduction."""

    def __init__(self, path: str, rank: int, world_size: int, slot_bytes: int, pids: list[int],
                 timeout_s: float):
        self.rank, self.world_size, self.slot_bytes = rank, world_size, slot_bytes
        self.pids, self.timeout_s = pids, timeout_s
        data = 2 * (world_size + 1) * slot_bytes
        raw = torch.from_file(path, shared=True, size=file_bytes(world_size, slot_bytes), dtype=torch.uint8)
        sets = raw[:data].view(2, world_size + 1, slot_bytes)
        self.slots, self.results = sets[:, :world_size], sets[:, world_size]
        lines = raw[data:].numpy().view(np.int64)[:: LINE // 8]
        self.sequence = lines[:world_size]  # one int64 per rank, each on its own cache line
        self.token = lines[world_size:]  # rank 0's random number: proves every rank maps the same file
        self.calls = 0
        self._fence = threading.Lock()  # acquire/release is a locked instruction: a full memory fence
        _open_reducers.add(self)

    # -- the DDP comm hook ---------------------------------------------------------------------

    def hook(self, state, bucket):  # no annotations: DDP rejects string ones (postponed evaluation)
        """Average one gradient bucket across ranks (DDP calls this once per bucket, in bucket order)."""
        buffer = bucket.buffer()
        if buffer.layout != torch.strided:  # sparse gradients (nn.Embedding(sparse=True)): gloo's job
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            return default_hooks.allreduce_hook(None, bucket)
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(self.all_reduce_mean_(buffer))
        return future

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace contiguous `tensor` by the mean of every rank's `tensor`, in place."""
        flat = tensor.view(-1)
        per_slot = self.slot_bytes // flat.element_size()
        for start in range(0, flat.numel(), per_slot):
            self._reduce_piece(flat[start:start + per_slot])
        return tensor

    def _reduce_piece(self, piece: torch.Tensor) -> None:
        world, numel, nbytes = self.world_size, piece.numel(), piece.numel() * piece.element_size()
        parity = (self.calls // 2) % 2  # two calls (barriers) per piece
        slots = self.slots[parity, :, :nbytes].view(piece.dtype)  # (world_size, numel)
        result = self.results[parity, :nbytes].view(piece.dtype)
        torch.div(piece, world, out=slots[self.rank])  # what DDP does before its all-reduce
        self._arrive()
        low, high = numel * self.rank // world, numel * (self.rank + 1) // world
        if high > low:  # this rank's share, summed in rank order
            share = result[low:high]
            torch.add(slots[0, low:high], slots[1, low:high], out=share)
            for other in range(2, world):
                share.add_(slots[other, low:high])
        self._arrive()
        piece.copy_(result)

    def _arrive(self) -> None:
        """Publish the next sequence number and wait until every rank has published it."""
        self.calls += 1
        with self._fence:  # the stores above are visible before the number (x86 keeps them ordered anyway)
            pass
        self.sequence[self.rank] = self.calls
        self._wait_for_everyone(self.calls)

    def _wait_for_everyone(self, call: int) -> None:
        """Spin until every rank has published `call`; then yield, then sleep, while waiting long."""
        sequence = self.sequence
        for _ in range(SPIN_ITERATIONS):
            if sequence.min() >= call:
                return
        start = last_check = time.monotonic()
        while (lowest := sequence.min()) < call:
            if lowest < 0:
                self._check_left(call)  # raises unless every rank that left had reached `call`
                if min(map(self._arrived, range(self.world_size))) >= call:
                    return
            now = time.monotonic()
            waited = now - start
            if waited < 0.005:
                os.sched_yield()
            else:
                time.sleep(0.00005 if waited < 0.1 else 0.001)
            if now - last_check > LIVENESS_EVERY_S:
                last_check = now
                self._check_peers(call, waited)

    def _check_left(self, call: int) -> None:
        """Raise if a rank left before reaching `call`; one that left after it did arrive."""
        for rank in range(self.world_size):
            value = int(self.sequence[rank])
            if value < 0 and -value - 1 < call:
                raise RuntimeError(f"rank {rank} (pid {self.pids[rank]}) left the job during the {ERROR_SIGN} "
                                   "(Connection closed by peer)")

    def _arrived(self, rank: int) -> int:
        """The last sequence number `rank` published (also after it left)."""
        value = int(self.sequence[rank])
        return -value - 1 if value < 0 else value

    def _check_peers(self, call: int, waited: float) -> None:
        late = [r for r in range(self.world_size) if self._arrived(r) < call]
        gone = [r for r in late if not _alive(self.pids[r])]
        if gone:
            raise RuntimeError(f"rank {gone[0]} (pid {self.pids[gone[0]]}) exited during the {ERROR_SIGN} "
                               "(Connection closed by peer)")
        if waited > self.timeout_s:
            raise RuntimeError(f"Timed out waiting {self.timeout_s:g} s for rank(s) "
                               f"{', '.join(map(str, late))} in the {ERROR_SIGN}")

    def leave(self) -> None:
        """Tell the peers this rank will not come (they fail at once instead of at the timeout)."""
        self.sequence[self.rank] = -(self.calls + 1)


_open_reducers: "weakref.WeakSet[SharedMemoryAllReduce]" = weakref.WeakSet()


def leave() -> None:
    """This process is leaving the job with an error: mark it gone in every open reducer."""
    for reducer in list(_open_reducers):
        reducer.leave()


def setup(env: DistEnv, device: torch.device, mode: str, gradient_bytes: int,
          timeout_s: float) -> SharedMemoryAllReduce | None:
    """The shared-memory all-reduce for `gradient_bytes` of gradients, or None (collective: every
    rank must call it). mode "auto" falls back to the backend's all-reduce when it cannot be
    used, "require" raises a UsageError saying why, "never" does not try."""
    if mode == "never" or env.world_size == 1:
        return None
    reason = unsupported_reason(env, device)
    if reason is None:
        opened = _create_and_open(env, slot_bytes_for(gradient_bytes, env.world_size), timeout_s)
        if isinstance(opened, SharedMemoryAllReduce):
            return opened
        reason = opened
    if mode == "require":
        raise UsageError(f"ddp.shm_allreduce=require, but {reason}; use ddp.shm_allreduce=auto or never")
    return None


def _create_and_open(env: DistEnv, slot_bytes: int, timeout_s: float) -> SharedMemoryAllReduce | str:
    """Rank 0 creates the file, every rank maps it; every rank gets the object, or the same reason."""
    pids = distributed.all_gather_object(os.getpid())
    path, token, problem, reducer = None, None, None, None
    if env.is_main:
        path = os.path.join(SHM_DIR, f"dtrain-allreduce-{uuid.uuid4().hex}")
        problem = _create(path, file_bytes(env.world_size, slot_bytes))
    created = env.is_main and problem is None
    try:
        if created:
            reducer, problem = _open(path, None, env, slot_bytes, pids, timeout_s)
            if reducer is not None:
                token = reducer.token[0] = int.from_bytes(os.urandom(7), "little") | 1  # never 0
        path, token, problem = distributed.broadcast_object((path, token, problem))
        if problem is not None:
            return problem
        if not env.is_main:
            reducer, problem = _open(path, token, env, slot_bytes, pids, timeout_s)
        problems = [p for p in distributed.all_gather_object(problem) if p]
    finally:
        if created:  # every rank has mapped the file (or failed, or the job broke): the name can go
            os.unlink(path)
    return problems[0] if problems else reducer


def _open(path: str, token: int | None, env: DistEnv, slot_bytes: int, pids: list[int],
          timeout_s: float) -> tuple[SharedMemoryAllReduce | None, str | None]:
    """Map the file rank 0 created and check its token (rank 0: None); (reducer, None) or (None, why not)."""
    if not os.path.exists(path):  # from_file would create a file of its own
        return None, f"rank {env.rank} does not see rank 0's {path} (another host or container?)"
    hidden = [r for r, pid in enumerate(pids) if not _alive(pid)]
    if hidden:  # a peer found "gone" while waiting would be a false alarm: keep the backend
        return None, (f"rank {env.rank} cannot see the process of rank {hidden[0]} (pid {pids[hidden[0]]}; "
                      "a separate PID namespace?)")
    try:
        reducer = SharedMemoryAllReduce(path, env.rank, env.world_size, slot_bytes, pids, timeout_s)
    except (OSError, RuntimeError) as exc:
        return None, f"rank {env.rank} could not map {path} ({exc})"
    if token is not None and int(reducer.token[0]) != token:
        return None, f"rank {env.rank} maps a different {path} than rank 0 (another host or container?)"
    return reducer, None


def _create(path: str, size: int) -> str | None:
    """Create and reserve `size` bytes at `path`; None on success, else why not."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as exc:
        return f"{path} cannot be created ({exc.strerror})"
    try:
        # Reserve the pages now: a tmpfs that is too small answers ENOSPC here instead of a
        # SIGBUS in the middle of training.
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        hint = " (give the container a larger /dev/shm)" if exc.errno == errno.ENOSPC else ""
        return f"{SHM_DIR} has no room for {size / 2**20:.1f} MiB{hint}"
    os.close(fd)
    return None
