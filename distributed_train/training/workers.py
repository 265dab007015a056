"""DataLoader worker processes: how they start, what they are sent, what a lost one tells.

Workers start by `data.worker_start_method`, by default from a forkserver (a process without
threads; docs/configuration.md says why not by a fork of the rank). They receive the dataset and
`collate` pickled, tensors through shared memory: what cannot travel is a one-line task error.
A worker that dies (the kernel's out-of-memory killer, a crash in native code) is named with what
ended it, where torch only says that one "exited unexpectedly".
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.util
import os
import pickle
import re
import shutil
import signal
import tempfile
import threading
import time
import warnings
from typing import Any, Iterator

from distributed_train.distributed.diagnose import position
from distributed_train.errors import DataWorkerLost, UsageError


def worker_options(num_workers: int, start_method: str) -> dict[str, Any]:
    """The DataLoader's `multiprocessing_context` and `worker_init_fn` for `data.worker_start_method`
    ("default" is Python's: fork on Linux before Python 3.14, forkserver from 3.14, spawn on macOS).

    A forkserver is started here, not at the first batch: it imports torch while the rank builds
    its model, and workers fork from it, a process without threads (a fork of the rank copies a
    lock another thread holds as held: the worker can hang). Each worker lets go of its copy of the
    forkserver's lifeline, so the forkserver ends with the rank, and the workers, whose parent it is,
    see that and end too (torch's DataLoader workers watch their parent process)."""
    if num_workers == 0:
        return {"multiprocessing_context": None}
    if start_method == "default":
        start_method = multiprocessing.get_start_method()
    context = multiprocessing.get_context(start_method)
    if start_method != "forkserver":
        return {"multiprocessing_context": context}
    context.set_forkserver_preload(["__main__", "torch"])
    _room_for_the_forkserver_socket()
    multiprocessing.forkserver.ensure_running()
    return {"multiprocessing_context": context, "worker_init_fn": leave_the_forkserver_to_the_rank}


# The forkserver listens on TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX, a Unix socket: its path must fit
# sun_path (108 bytes on Linux, 104 on macOS, the final NUL included).
_SOCKET_PATH_MAX = 103
_SOCKET_IN_TMPDIR = len("/pymp-12345678/listener-12345678")


def _room_for_the_forkserver_socket() -> None:
    """Under a TMPDIR too long for the forkserver's socket (a job's scratch folder, deep in a
    cluster's file system), give multiprocessing its folder in the first short system one (as
    Python 3.14 does); Python 3.11 to 3.13 fail with "AF_UNIX path too long"."""
    config = multiprocessing.process.current_process()._config
    base = tempfile.gettempdir()
    if config.get("tempdir") is not None or len(os.fsencode(base)) + _SOCKET_IN_TMPDIR <= _SOCKET_PATH_MAX:
        return  # chosen already (the forkserver may listen there), or fits
    for candidate in ("/tmp", "/var/tmp", "/dev/shm"):
        if len(candidate) + _SOCKET_IN_TMPDIR <= _SOCKET_PATH_MAX and os.access(candidate, os.W_OK | os.X_OK):
            folder = tempfile.mkdtemp(prefix="pymp-", dir=candidate)
            # as multiprocessing's own folder: removed at exit (a rank's: release_multiprocessing)
            multiprocessing.util.Finalize(None, shutil.rmtree, args=(folder,), kwargs={"ignore_errors": True},
                                          exitpriority=-100)
            config["tempdir"] = folder
            return
    raise UsageError(f"TMPDIR={base} is too long for the socket of the DataLoader workers' forkserver "
                     f"(data.worker_start_method=forkserver; {_SOCKET_PATH_MAX - _SOCKET_IN_TMPDIR} "
                     "characters at most) and /tmp is not writable: set TMPDIR to a shorter folder, or "
                     "data.worker_start_method=spawn")


def release_multiprocessing() -> None:
    """What multiprocessing's exit hook would do, less joining threads (but closed queues' feeders):
    unlink the named semaphores of this process's queues (DataLoader workers started by forkserver
    or spawn use such queues) and remove its pymp-* folder in TMPDIR with the forkserver's socket,
    for a rank that leaves by os._exit (cli/train.py). Else Python's resource tracker unlinks the
    semaphores after this process is gone, warning of "leaked semaphore objects" below the run's
    last line, and every rank of every run leaves a folder in TMPDIR."""
    # A queue's feeder thread holds the queue's semaphores until it ends (a closed queue's, within
    # milliseconds), and then runs their finalizers itself: unlink, then unregister. os._exit
    # between the two leaves the resource tracker a "leaked" semaphore that no longer exists (two
    # warnings). Let them end; a live queue's feeder, which never does, costs half a second in all.
    deadline = time.monotonic() + 0.5
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    run_finalizers = getattr(multiprocessing.util, "_run_finalizers", None)  # what the atexit hook runs
    if run_finalizers is not None:
        run_finalizers(0)  # priority >= 0: semaphores, queue closes, sockets; never joins a thread
    folder = multiprocessing.process.current_process()._config.get("tempdir")  # its finalizer: after joins
    if not folder:
        return
    address = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_forkserver_address", None)
    if isinstance(address, str) and os.path.dirname(address) == folder:
        with contextlib.suppress(OSError):  # a socket without a finalizer: the rank's to remove
            os.unlink(address)
    # Not the folder's other sockets: DataLoader workers still running (after a failure) keep theirs
    # there, and remove them as they exit (a traceback each if they were gone): the folder then stays.
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def leave_the_forkserver_to_the_rank(worker_id: int) -> None:
    """In a worker forked by the forkserver: close its end of the pipe that keeps the forkserver
    alive (the forkserver exits when every holder has closed it; otherwise the workers would keep
    it, and it them, alive forever after the rank is killed)."""
    server = multiprocessing.forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None


def start_workers(loader: Any) -> Iterator[Any]:
    """iter(loader). Workers started by forkserver or spawn receive the dataset pickled, its tensors
    moved into shared memory: a dataset that cannot be pickled, or whose tensors /dev/shm cannot
    hold, is a task error naming the fix (those are the errors iter() raises: the dataset and
    collate run in the workers, and their errors come with the batches)."""
    context = getattr(loader, "multiprocessing_context", None)
    try:
        with warnings.catch_warnings():  # torch's own warning for it says less than the error below
            warnings.filterwarnings("ignore", "Got pickle error", UserWarning)
            return iter(loader)
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as exc:
        method = context.get_start_method() if context is not None else "fork"
        if method == "fork":  # nothing is pickled (or there are no workers)
            raise
        if isinstance(exc, RuntimeError):  # torch could not allocate the shared memory
            fix = f"its tensors move into shared memory when workers start: {_shm_room()}"
        else:
            fix = "keep open files and handles out of the pickled state (open them in __getitem__ or __iter__)"
        raise UsageError(f"task.train_dataset() or task.collate cannot be sent to DataLoader workers started "
                         f"by {method} (data.worker_start_method): {exc}; {fix}, or set "
                         "data.worker_start_method=fork (docs/configuration.md)") from exc


def _shm_room() -> str:
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return "give the shared memory more room"
    return (f"/dev/shm has {free / 2**20:.0f} MiB free; give it more (docker run --shm-size, a memory "
            "emptyDir on Kubernetes)")


def next_batches(batches: Iterator[Any], count: int) -> list[Any]:
    """The next `count` batches of a DataLoader iterator. A failure after which one of its workers
    is gone is DataWorkerLost, naming each lost worker and what ended it (exit 1: a job that ran
    out of memory is not a mistake in the task)."""
    try:
        return [next(batches) for _ in range(count)]
    except StopIteration:
        raise
    except Exception as exc:
        # A worker killed while its batch was in transit fails the read (a connection reset, an
        # EOF) before the worker's end is known: wait for it briefly then, and only then (not for
        # the task's own error, which torch re-raises from a live worker naming it).
        in_transit = isinstance(exc, (OSError, EOFError, RuntimeError)) and "in DataLoader worker process" \
            not in str(exc)
        lost = lost_workers(batches, wait_s=2.0 if in_transit else 0.0)
        if not lost:
            raise
        raise DataWorkerLost(f"DataLoader {', '.join(lost)} while this rank loaded the batches of step "
                             f"{position.step}; {_lost_hint(lost)}") from exc


def _lost_hint(lost: list[str]) -> str:
    if any("SIGKILL" in worker for worker in lost):
        return ("SIGKILL is most often the kernel's out-of-memory killer (see dmesg): give each rank more "
                "memory, or lower data.num_workers")
    if any("SIGBUS" in worker for worker in lost):  # a worker's write to /dev/shm found no room
        return f"SIGBUS is most often a full shared memory: {_shm_room()}, or lower data.num_workers"
    return "its own output above says more (dtrain train --debug shows the traceback here)"


# Workers started by fork or spawn are the rank's children: torch's SIGCHLD handler raises this
# (its C++ text) wherever the rank is when one dies: in a step, a checkpoint, a log.
_TORCH_SAYS_LOST = re.compile(r"DataLoader worker \(pid (\d+)\) (?:is killed by signal: ([^.]+)\."
                              r"|exited unexpectedly with exit code (-?\d+)\.)")


@contextlib.contextmanager
def worker_deaths_explained() -> Iterator[None]:
    """Re-raise torch's report of a worker death from its SIGCHLD handler, raised anywhere in the
    block (or what it caused: a first step's error), as DataWorkerLost naming the worker and what
    ended it."""
    try:
        yield
    except Exception as exc:
        lost = _lost_in_passing(exc)
        if lost is None:
            raise
        raise lost from exc


def _lost_in_passing(exc: BaseException) -> DataWorkerLost | None:
    seen, chain = exc, 0
    while seen is not None and chain < 20:
        if isinstance(seen, DataWorkerLost):
            return None
        found = _TORCH_SAYS_LOST.search(str(seen)) if isinstance(seen, RuntimeError) else None
        if found:
            pid, description, code = found.groups()
            names = {signal.strsignal(number): number.name for number in signal.Signals}
            how = (f"was killed by {names.get(description, 'signal ' + repr(description))}" if description
                   else f"exited with code {code}")
            lost = [f"worker (pid {pid}) {how}"]
            return DataWorkerLost(f"DataLoader {lost[0]} in {position.phase} at step {position.step}; "
                                  f"{_lost_hint(lost)}")
        seen, chain = seen.__cause__ or seen.__context__, chain + 1
    return None


def lost_workers(batches: Iterator[Any], wait_s: float = 0.0) -> list[str]:
    """'worker I (pid P) was killed by SIG... / exited with code N' for each worker process of a
    DataLoader iterator that has ended (torch keeps them in `_workers`; none without workers),
    waiting up to `wait_s` for one to end if none has."""
    processes = list(getattr(batches, "_workers", ()))
    if wait_s and processes and all(worker.exitcode is None for worker in processes):
        multiprocessing.connection.wait([worker.sentinel for worker in processes], timeout=wait_s)
    lost = []
    for index, worker in enumerate(processes):
        code = worker.exitcode
        if code is None:
            continue
        try:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        except ValueError:
            how = f"was killed by signal {-code}"
        lost.append(f"worker {index} (pid {worker.pid}) {how}")
    return lost
