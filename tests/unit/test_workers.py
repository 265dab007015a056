"""DataLoader worker processes without starting any: the start method's options, and how a lost
worker is named (tests/distributed/test_data_workers.py starts real ones)."""

import multiprocessing.process
import multiprocessing.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from distributed_train.errors import DataWorkerLost, UsageError
from distributed_train.training import workers
from tests.helpers import REPO


def test_pythons_default_start_method_gets_the_care_of_the_named_one(monkeypatch):
    # Python 3.14 starts workers from a forkserver by default: its workers must also let go of the
    # forkserver's lifeline, or they outlive a killed rank (tests/distributed/test_data_workers.py).
    monkeypatch.setattr(workers.multiprocessing, "get_start_method", lambda: "forkserver")
    monkeypatch.setattr(workers.multiprocessing.forkserver, "ensure_running", lambda: None)
    options = workers.worker_options(2, "default")
    assert options["multiprocessing_context"].get_start_method() == "forkserver"
    assert options["worker_init_fn"] is workers.leave_the_forkserver_to_the_rank
    assert workers.worker_options(0, "forkserver") == {"multiprocessing_context": None}
    assert "worker_init_fn" not in workers.worker_options(2, "spawn")  # a spawned worker's parent is the rank


class Worker:
    def __init__(self, pid, exitcode):
        self.pid, self.exitcode = pid, exitcode
        self.sentinel = None  # never waited on: a test with a live worker fails with a non-transport error


class Batches:
    """A DataLoader iterator whose workers have the given exit codes, failing as torch's does."""

    def __init__(self, *exitcodes, error=None):
        self._workers = [Worker(100 + i, code) for i, code in enumerate(exitcodes)]
        self.error = error

    def __next__(self):
        raise self.error or RuntimeError("DataLoader worker (pid(s) 101) exited unexpectedly")


def test_a_worker_killed_by_sigkill_is_named_with_the_likely_cause():
    with pytest.raises(DataWorkerLost) as info:
        workers.next_batches(Batches(None, -signal.SIGKILL), 2)
    message = str(info.value)
    assert message.startswith("DataLoader worker 1 (pid 101) was killed by SIGKILL while this rank loaded "
                              "the batches of step "), message
    assert "out-of-memory killer" in message and "data.num_workers" in message, message
    assert info.value.exit_code == 1 and info.value.every_rank  # not the task's mistake; this rank's alone


def test_other_endings_are_named_too():
    with pytest.raises(DataWorkerLost, match=r"worker 0 \(pid 100\) was killed by SIGSEGV, worker 1 "
                                             r"\(pid 101\) exited with code 3 while"):
        workers.next_batches(Batches(-signal.SIGSEGV, 3), 1)
    with pytest.raises(DataWorkerLost, match=r"was killed by signal 99 while"):
        workers.next_batches(Batches(-99), 1)


def test_failures_with_every_worker_alive_and_the_end_of_a_pass_pass_through():
    with pytest.raises(KeyError):  # the dataset's own error, re-raised from a live worker
        workers.next_batches(Batches(None, None, error=KeyError(7)), 1)
    raised = OSError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback ...")
    with pytest.raises(OSError, match="Caught OSError"):  # not waited on (a wait on sentinel None fails)
        workers.next_batches(Batches(None, error=raised), 1)
    with pytest.raises(StopIteration):  # a pass ended: its workers have exited, and that is fine
        workers.next_batches(Batches(0, 0, error=StopIteration()), 1)
    assert workers.next_batches(iter([1, 2, 3]), 2) == [1, 2]  # no workers at all


def test_a_batch_lost_in_transit_waits_briefly_for_its_workers_end():
    # Killed while its batch was on the way: the read fails (connection reset) before the worker's
    # end is known to the rank; the sentinel tells when it is.
    read, write = os.pipe()
    worker = Worker(100, None)
    worker.sentinel = read

    def killed():
        time.sleep(0.2)
        worker.exitcode = -signal.SIGKILL
        os.write(write, b"x")

    batches = Batches(error=ConnectionResetError(104, "Connection reset by peer"))
    batches._workers = [worker]
    threading.Thread(target=killed).start()
    try:
        with pytest.raises(DataWorkerLost, match=r"worker 0 \(pid 100\) was killed by SIGKILL"):
            workers.next_batches(batches, 1)
    finally:
        os.close(read)
        os.close(write)


def torchs_report_of(ending: str) -> RuntimeError:
    """What torch's SIGCHLD handler raises in a rank whose forked or spawned worker ended so (Python
    code run by the child): its own check (torch._C) on a real child process."""
    import torch

    child = subprocess.Popen([sys.executable, "-c", f"import os, signal; {ending}"])
    torch._C._set_worker_pids(4242, (child.pid,))
    try:
        for _ in range(1000):
            try:
                torch._C._error_if_any_worker_fails()
            except RuntimeError as exc:
                return exc
            time.sleep(0.01)
        raise AssertionError("torch did not report the child's end")
    finally:
        torch._C._remove_worker_pids(4242)
        child.wait()


def test_a_worker_death_torch_reports_anywhere_in_a_step_is_named_in_one_line():
    # Workers started by fork or spawn are the rank's children: torch's SIGCHLD handler raises its
    # report wherever the rank is (mid-step, mid-checkpoint), with no worker index.
    killed = torchs_report_of("os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(DataWorkerLost) as info, workers.worker_deaths_explained():
        raise killed
    message = str(info.value)
    assert re.fullmatch(r"DataLoader worker \(pid \d+\) was killed by SIGKILL in .* at step .*; SIGKILL is "
                        r"most often the kernel's out-of-memory killer .*data.num_workers", message), message
    assert info.value.__cause__ is killed
    exited = torchs_report_of("os._exit(3)")
    with pytest.raises(DataWorkerLost, match=r"worker \(pid \d+\) exited with code 3 in "), \
            workers.worker_deaths_explained():
        try:  # on the first step, explained as the task's error first: the worker's end is the cause
            raise exited
        except RuntimeError as exc:
            raise UsageError("loading the first batch failed on the first step; fix the task") from exc
    bus = RuntimeError(str(killed).replace("Killed", "Bus error") + "It is possible that dataloader's workers are "
                       "out of shared memory. Please try to raise your shared memory limit.")
    with pytest.raises(DataWorkerLost, match=r"killed by SIGBUS .*a full shared memory: (/dev/shm|give)"), \
            workers.worker_deaths_explained():
        raise bus
    for other in (RuntimeError("CUDA error: an illegal memory access"), KeyError(3),
                  DataWorkerLost("DataLoader worker 0 (pid 1) was killed by SIGKILL while ...")):
        with pytest.raises(type(other)) as info, workers.worker_deaths_explained():
            raise other
        assert info.value is other


LEAVES_AS_A_RANK = """
import multiprocessing, multiprocessing.queues, os, threading, time
from multiprocessing import synchronize

from distributed_train.training.workers import release_multiprocessing

deleted, unlinked = threading.Event(), threading.Event()


def feed(*args, feed=multiprocessing.queues.Queue._feed):
    feed(*args)  # ends at the queue's close
    deleted.wait(10)  # so the feeder's arguments hold the semaphores last, as a DataLoader's may


def cleanup(name, cleanup=synchronize.SemLock._cleanup):
    if threading.current_thread() is threading.main_thread():
        return cleanup(name)
    from multiprocessing.resource_tracker import unregister  # the feeder thread ending, slowed down
    synchronize.sem_unlink(name)
    unlinked.set()
    time.sleep(0.01)
    unregister(name, "semaphore")


multiprocessing.queues.Queue._feed = staticmethod(feed)
synchronize.SemLock._cleanup = staticmethod(cleanup)
queue = multiprocessing.get_context("spawn").Queue()
queue.put(1)  # starts its feeder thread
queue.cancel_join_thread()
queue.close()  # as torch closes a DataLoader iterator's index queues
del queue
deleted.set()
assert unlinked.wait(10)  # the rank leaves while the feeder thread is between unlink and unregister
release_multiprocessing()
os._exit(0)
"""


def test_a_rank_leaving_lets_closed_queues_feeder_threads_finish_their_semaphores():
    # The feeder thread of a closed queue drops the queue's last semaphores as it ends and runs
    # their finalizers (unlink, then unregister) itself; os._exit between the two made Python's
    # resource tracker warn of a leaked semaphore that no longer exists (about 1 spawn run in 5).
    proc = subprocess.run([sys.executable, "-c", LEAVES_AS_A_RANK], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # stderr's end: the tracker's too
    assert proc.returncode == 0 and "resource_tracker" not in proc.stderr, proc.stderr


@pytest.fixture
def fresh_multiprocessing_config(monkeypatch):
    """This process's multiprocessing settings, without a temporary folder chosen yet."""
    config = {k: v for k, v in multiprocessing.process.current_process()._config.items() if k != "tempdir"}
    monkeypatch.setattr(multiprocessing.process.current_process(), "_config", config)
    return config


def test_a_tmpdir_too_long_for_the_forkserver_socket_is_replaced_by_a_short_one(monkeypatch,
                                                                                fresh_multiprocessing_config):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: "/scratch/" + "x" * 62)  # 71 characters: fits
    workers._room_for_the_forkserver_socket()
    assert "tempdir" not in fresh_multiprocessing_config  # multiprocessing makes its own, in TMPDIR
    monkeypatch.setattr(tempfile, "gettempdir", lambda: "/scratch/" + "x" * 63)  # one more: it would not
    workers._room_for_the_forkserver_socket()
    folder = fresh_multiprocessing_config["tempdir"]
    try:
        assert folder.startswith("/tmp/pymp-") and os.path.isdir(folder), folder
        assert any(getattr(f, "_args", None) == (folder,) for f in multiprocessing.util._finalizer_registry.values())
    finally:
        shutil.rmtree(folder)


def test_a_long_tmpdir_without_a_writable_short_folder_is_one_line(monkeypatch, fresh_multiprocessing_config):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: "/scratch/" + "x" * 100)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UsageError, match=r"^TMPDIR=/scratch/x+ is too long for the socket of the DataLoader "
                                         r"workers' forkserver .* set TMPDIR to a shorter folder, or "
                                         r"data.worker_start_method=spawn$"):
        workers._room_for_the_forkserver_socket()
    assert "tempdir" not in fresh_multiprocessing_config
