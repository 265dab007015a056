"""The distributed environment: torchrun's variables, backend and device choice, init/teardown,
rank-0 helpers and the few reductions the trainer needs."""

from __future__ import annotations

import datetime
import os
import pickle
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as torch_dist

from distributed_train.distributed import diagnose, slurm
from distributed_train.errors import CommunicationFailure, UsageError

T = TypeVar("T")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as torchrun describes it (world size 1 without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = ""
    master_port: int = 0

    @property
    def is_distributed(self) -> bool:
        """True when started by torchrun (a process group is created, even for world size 1)."""
        return bool(self.master_addr)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name)
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise UsageError(f"environment variable {name} must be >= 0, got {value}")
    return value


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun's variables into a DistEnv; none set means a single process."""
    environ = os.environ if environ is None else environ
    environ = {**environ, **slurm.rank_environ(environ)}  # a task `srun` started without torchrun
    present = [v for v in _TORCHRUN_VARS if v in environ]
    if not present:
        return DistEnv()
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in environ]
    if missing:
        raise UsageError(
            f"incomplete torchrun environment: {', '.join(present)} set but {', '.join(missing)} "
            "missing; start with torchrun or dtrain launch, or unset them for one process"
        )
    rank, world = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
    local_rank = _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    if world < 1 or rank >= world:
        raise UsageError(f"RANK={rank} must be smaller than WORLD_SIZE={world} (and WORLD_SIZE >= 1)")
    if local_world < 1 or local_rank >= local_world or local_world > world:
        raise UsageError(
            f"LOCAL_RANK={local_rank} / LOCAL_WORLD_SIZE={local_world} do not fit WORLD_SIZE={world}"
        )
    if not environ["MASTER_ADDR"]:
        raise UsageError("environment variable MASTER_ADDR is empty")
    port = _int_var(environ, "MASTER_PORT")
    if not 0 < port < 65536:
        raise UsageError(f"environment variable MASTER_PORT must be a TCP port, got {port}")
    return DistEnv(rank, world, local_rank, local_world, environ["MASTER_ADDR"], port)


def pick_backend(requested: str, cuda_available: bool | None = None) -> str:
    """nccl with CUDA, else gloo; asking for nccl without CUDA is a usage error."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise UsageError("dist.backend=nccl needs CUDA GPUs and none is visible; use dist.backend=gloo or auto")
    return requested


def pick_device(backend: str, env: DistEnv) -> torch.device:
    """cuda:LOCAL_RANK for nccl (or a single process with CUDA), else cpu."""
    if backend == "nccl":
        if env.local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "lower --nproc-per-node"
            )
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def cpu_count() -> int:
    """CPU cores this process may run on (respects affinity / container cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def limit_compile_threads(env: DistEnv) -> int:
    """torch.compile's Inductor sizes its compile workers to all the machine's cores, in every rank:
    8 ranks on 16 cores would start ~128 compile processes and the first step could outlast
    dist.timeout_s. Each local rank gets its share (TORCHINDUCTOR_COMPILE_THREADS wins when set)."""
    given = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
    if given and given.isdigit() and int(given) > 0:
        return int(given)
    share = max(1, cpu_count() // env.local_world_size)
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(share)
    import sys

    if "torch._inductor.config" in sys.modules:  # read at its import: set it there too
        sys.modules["torch._inductor.config"].compile_threads = share
    return share


def set_cpu_threads(env: DistEnv) -> int:
    """Give each local rank its share of the cores, unless OMP_NUM_THREADS says otherwise."""
    threads = os.environ.get("OMP_NUM_THREADS")
    n = int(threads) if threads and threads.isdigit() and int(threads) > 0 else None
    if n is None:
        n = max(1, cpu_count() // env.local_world_size)
    torch.set_num_threads(n)
    return n


def init(env: DistEnv, backend: str, device: torch.device, timeout_s: float) -> None:
    """Create the default process group when launched by torchrun (explicit timeout, never 30 min)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.is_distributed and not torch_dist.is_initialized():
        try:
            torch_dist.init_process_group(
                backend=backend,
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
        except torch_dist.DistError as exc:  # store unreachable, or the other ranks never came
            address = f"{env.master_addr}:{env.master_port}"
            raise diagnose.explain_join_failure(exc, env.rank, env.world_size, address, timeout_s) from exc


def teardown(failed: bool = False) -> None:
    """Destroy the process group if one exists (safe to call twice).

    After a failure an NCCL group is aborted instead: since torch 2.6 destroying one flushes the
    collectives in flight (ncclCommFinalize), which waits for ever on a peer that is gone or stuck,
    so the worker would hang at exit instead of reporting. gloo's destroy does not wait on peers."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    abort = getattr(torch_dist.distributed_c10d, "_abort_process_group", None)
    if failed and abort is not None and "nccl" in str(torch_dist.get_backend()):
        abort()  # every group, the default one included, in one NCCL group call
    else:
        torch_dist.destroy_process_group()


def active() -> bool:
    """True when collectives must be called (a process group with more than one rank)."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def barrier() -> None:
    """Every rank waits for every other (no-op in a single process)."""
    if active():
        with diagnose.collective("barrier"):
            torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` across ranks in place and return it."""
    if active():
        with diagnose.collective("all_reduce"):
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def reduce_and_read(vector: torch.Tensor, what: str) -> list[float]:
    """Sum the 1-d `vector` across ranks and read it on the host (the one host sync of a log step,
    an evaluation or a skip decision), checked: every rank adds 1 to an extra element, which must
    read the world size. Under NCCL's error handling (TORCH_NCCL_ASYNC_ERROR_HANDLING=2) a group
    the watchdog aborted under the read leaves whatever the buffer held, without an error: a log
    line, an eval metric or the NaN check would take that for the job's numbers."""
    if not active():
        return vector.tolist()
    checked = torch.cat([vector, torch.ones(1, dtype=vector.dtype, device=vector.device)])
    all_reduce_sum(checked)
    *values, counted = checked.tolist()
    world_size = torch_dist.get_world_size()
    if counted != world_size:
        raise corrupt_reduction(what, counted, world_size)
    return values


def corrupt_reduction(what: str, counted: float, world_size: int) -> CommunicationFailure:
    """The error for a checked reduction that not every rank is counted in."""
    return corrupt_collective(f"all-reduce of the {what}", f"{counted:g} of {world_size} ranks counted")


def corrupt_collective(what: str, detail: str) -> CommunicationFailure:
    """The error for a collective whose result fails its check (`detail`: how)."""
    return CommunicationFailure(
        f"rank {torch_dist.get_rank()}: the {what} came back corrupt ({detail}): the communicator failed "
        f"under it (NCCL's watchdog aborts it after {diagnose.TIMEOUT_SETTING} or when a peer fails); the "
        "other ranks' messages say why")


# The object collectives are checked too: an aborted group leaves their receive buffers as they were,
# which the caching allocator may have given the previous call's bytes (the last save's rng states,
# the last stop decision). Each payload carries its call's number in the default group, the same on
# every rank since collectives run in one order everywhere; a payload with another number, or one
# that does not unpickle, is a CommunicationFailure.
_object_calls: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _stamped(obj: object) -> tuple[int, bytes]:
    """This object collective's number and its payload (pickled here: a pickling error is this
    rank's own, raised before any communication)."""
    world = torch_dist.group.WORLD
    call = _object_calls.get(world, 0) + 1
    _object_calls[world] = call
    return call, pickle.dumps((call, obj))


def _corrupt_object_collective(detail: str) -> CommunicationFailure:
    """The error for the object collective running now (its phase names it) whose result is not
    what was sent (`detail`: how)."""
    return corrupt_collective(diagnose.position.phase, detail)


def _receive(collective: Callable[[], None]) -> None:
    """Run torch's object collective; a failure to read what came back is a corrupt result."""
    try:
        collective()
    except Exception as exc:
        if diagnose.is_communication_failure(exc):
            raise
        raise _corrupt_object_collective(diagnose.describe(exc)) from exc


def _unstamped(payload: object, call: int) -> Any:
    """The object in a payload received by object collective number `call`, checked."""
    try:
        stamp, obj = pickle.loads(payload)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - whatever garbage raises, it is not the data sent
        raise _corrupt_object_collective(diagnose.describe(exc)) from exc
    if stamp != call:
        raise _corrupt_object_collective(f"it holds object collective {stamp}'s data, this is {call}")
    return obj


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s Python object on every rank."""
    if not active():
        return obj
    call, payload = _stamped(obj)
    box = [payload]
    with diagnose.collective("broadcast_object"):
        _receive(lambda: torch_dist.broadcast_object_list(box, src=src))
        return obj if torch_dist.get_rank() == src else _unstamped(box[0], call)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's Python object, in rank order."""
    if not active():
        return [obj]
    call, payload = _stamped(obj)
    out: list = [None] * torch_dist.get_world_size()
    with diagnose.collective("all_gather_object"):
        _receive(lambda: torch_dist.all_gather_object(out, payload))
        return [_unstamped(each, call) for each in out]


def main_computes(env: DistEnv, fn: Callable[..., T], *args, **kwargs) -> T:
    """Rank 0 computes a value (e.g. inspects the file system) and every rank gets it.

    A UsageError raised on rank 0 is raised on every rank too, so no rank is left waiting.
    """
    result: tuple = ("ok", None)
    if env.is_main:
        try:
            result = ("ok", fn(*args, **kwargs))
        except UsageError as exc:
            result = ("error", str(exc))
    status, value = broadcast_object(result)
    if status == "error":
        raise UsageError(value)
    return value


def on_main(env: DistEnv, fn: Callable[..., T], *args, **kwargs) -> T | None:
    """Run a side effect (a file write, a print) on global rank 0 only; no collective inside."""
    return fn(*args, **kwargs) if env.is_main else None
