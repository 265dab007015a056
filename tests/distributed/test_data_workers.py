"""DataLoader workers in a fresh process (a spawned rank), not in the test process: a worker
forked from a process with other threads (pytest-xdist's) can deadlock at start."""

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from torch.utils.data import Dataset

from tests.helpers import REPO, clean_env, dtrain, jobs_in_rank, run_ranks, temp_leftovers

pytestmark = pytest.mark.distributed


def bad_token_through_a_worker(rank: int, world_size: int, tmp: str) -> str:
    """The one-line error of a token id >= the vocabulary, raised in a DataLoader worker."""
    from types import SimpleNamespace

    from distributed_train.batches import BatchPlan
    from distributed_train.errors import UsageError
    from distributed_train.tasks.lm import LMTask
    from distributed_train.training.data import TrainBatchSampler, make_loader

    values = np.arange(20, dtype=np.uint16)
    values[13] = 999  # in window 2 (tokens 10..14)
    path = f"{tmp}/t.bin"
    values.tofile(path)
    train = LMTask(SimpleNamespace(task_args={"train": path, "vocab_size": 100, "seq_len": 4,
                                              "val_fraction": 0.25})).train_dataset()
    sampler = TrainBatchSampler(len(train), BatchPlan.make(3, 1, None), 0, seed=0)
    try:
        list(make_loader(train, sampler, None, num_workers=1, pin_memory=False, seed=0))
    except UsageError as exc:
        return str(exc)
    return "no error"


def test_a_bad_token_read_in_a_dataloader_worker_is_still_one_line(tmp_path):
    (message,) = run_ranks(bad_token_through_a_worker, 1, str(tmp_path), timeout=120)
    assert "token id 999 at token offset 13 of" in message and "t.bin" in message, message
    assert "\n" not in message, message


AUGMENT = [f"--task={REPO / 'tests' / 'tasks' / 'augment.py'}:AugmentTask", "--train.batch_size=16",
           "--train.max_steps=8", "--seed=4", "--log.every_steps=4"]  # 96 samples: 8 steps cross an epoch
START_METHODS = {"in-process": ["--data.num_workers=0"],
                 "default": ["--data.num_workers=1"],
                 "spawn": ["--data.num_workers=2", "--data.worker_start_method=spawn"]}


def jobs_with_start_methods(rank: int, world_size: int, tmp: str) -> dict:
    """Each START_METHODS job; the start method of each train loader this rank built."""
    from distributed_train.training import stream

    built = []

    def recording_make_loader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        context = getattr(loader, "multiprocessing_context", None)
        built.append(context.get_start_method() if context is not None else None)
        return loader

    make_loader, stream.make_loader = stream.make_loader, recording_make_loader
    jobs = [(name, [*AUGMENT, *overrides, f"--run_dir={tmp}/{name}"]) for name, overrides in START_METHODS.items()]
    return {"results": jobs_in_rank(rank, world_size, jobs, tmp), "start_methods": built}


def test_workers_started_by_forkserver_or_spawn_draw_the_same_samples(tmp_path):
    # A task loaded from its file pickles into workers that start from a fresh interpreter (by
    # default from a forkserver), and its random augmentation draws what it draws in the training
    # process (seeded per sample). Not `fork` here: forked from these ranks, with their gloo and
    # heartbeat threads, a worker can hang at start (see the next test); `dtrain train` trains with
    # it in tests/e2e/test_bad_input_matrix.py.
    rank0, rank1 = run_ranks(jobs_with_start_methods, 2, str(tmp_path), timeout=180)
    assert rank0["start_methods"] == rank1["start_methods"] == [None, "forkserver", "spawn"]
    reference = rank0["results"]["in-process"]
    for name in ("default", "spawn"):
        state = rank0["results"][name]["state"]
        assert all(torch.equal(state[k], reference["state"][k]) for k in reference["state"]), name
        assert rank0["results"][name]["summary"]["train_loss"] == reference["summary"]["train_loss"], name


# A library's module-level lock (a tokenizer's, h5py's, a logging handler's) that the dataset takes
# in __getitem__. A fork copies it as it is at that moment: held, when another thread of the rank
# is inside the library, and no thread of the worker will ever release it.
LIBRARY_LOCK = threading.Lock()


class NeedsTheLibraryLock(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        # Not forever: a worker that inherited the lock held fails the test and exits.
        if not LIBRARY_LOCK.acquire(timeout=10):
            raise RuntimeError("this worker's copy of the lock stays held: it was forked while a thread held it")
        LIBRARY_LOCK.release()
        return torch.tensor([float(index)])


def batches_while_another_thread_holds_a_lock(rank: int, world_size: int) -> list:
    from distributed_train.batches import BatchPlan
    from distributed_train.config import DataConfig
    from distributed_train.training.data import TrainBatchSampler, make_loader
    from distributed_train.training.workers import start_workers

    held, release = threading.Event(), threading.Event()

    def inside_the_library():
        with LIBRARY_LOCK:
            held.set()
            release.wait()

    thread = threading.Thread(target=inside_the_library, daemon=True)
    thread.start()
    held.wait()
    try:
        sampler = TrainBatchSampler(8, BatchPlan.make(4, 1, None), 0, seed=0)
        loader = make_loader(NeedsTheLibraryLock(), sampler, None, num_workers=2, pin_memory=False, seed=0,
                             start_method=DataConfig().worker_start_method)
        return [batch.flatten().tolist() for batch in start_workers(loader)]
    finally:
        release.set()


def test_default_workers_do_not_inherit_locks_held_by_the_ranks_threads():
    # Forked from this rank, both workers would wait forever for the lock.
    (batches,) = run_ranks(batches_while_another_thread_holds_a_lock, 1, timeout=120)
    assert sorted(sum(batches, [])) == [float(i) for i in range(8)], batches


def running(processes: list) -> list:
    """Those of `processes` still running (a zombie has ended: only its exit status is left)."""
    def runs(process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [process for process in processes if runs(process)]


def test_workers_end_when_their_rank_is_killed(tmp_path):
    # SIGKILL (the OOM killer, a lost node's agent) gives the rank no chance to stop its workers.
    # Forked or spawned workers see their parent gone; the default's parent is the forkserver, which
    # must end with the rank, or the workers (and their copies of the dataset) stay forever.
    run_dir = tmp_path / "run"
    scratch = tempfile.mkdtemp(prefix="dtrain-t-")  # what the killed rank cannot remove: its pymp-* folder
    rank = subprocess.Popen([sys.executable, "-m", "distributed_train", "train", "--task=tests/tasks/toy.py:Regression",
                             "--train.batch_size=8", "--train.max_steps=1000000", "--log.every_steps=1",
                             "--data.num_workers=2", f"--run_dir={run_dir}"],
                            cwd=REPO, env=clean_env(TMPDIR=scratch), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    below = []
    try:
        for _ in range(600):  # training: the workers are up
            if (run_dir / "metrics.jsonl").exists() and '"kind": "train"' in (run_dir / "metrics.jsonl").read_text():
                break
            assert rank.poll() is None, f"the rank exited with {rank.returncode}"
            time.sleep(0.2)
        below = psutil.Process(rank.pid).children(recursive=True)
        assert len(below) >= 3, below  # the forkserver and two workers (and the resource tracker)
        rank.send_signal(signal.SIGKILL)
        rank.wait()
        for _ in range(300):  # torch's workers look at their parent every 5 s
            if not running(below):
                break
            time.sleep(0.2)
        assert not running(below), "processes of the killed rank left running"
    finally:
        rank.kill()
        for process in running(below):
            process.kill()
        shutil.rmtree(scratch, ignore_errors=True)


def test_workers_start_under_a_tmpdir_too_long_for_the_forkserver_socket(tmp_path):
    # A job's scratch folder deep in a cluster's file system: Python before 3.14 cannot put the
    # forkserver's socket under it ("AF_UNIX path too long"); the workers start all the same.
    scratch = tmp_path / ("scratch-" + "x" * 80)
    scratch.mkdir()
    for name, launch in {"train": ["train"], "launch": ["launch", "--nproc-per-node", "2"]}.items():
        run_dir = tmp_path / name  # an interpreter's exit, and ranks' exits (os._exit)
        dtrain(*launch, "--task=tests/tasks/toy.py:Regression", "--train.batch_size=8", "--train.max_steps=3",
               "--data.num_workers=2", f"--run_dir={run_dir}", cwd=REPO,
               env=clean_env(TMPDIR=str(scratch)), timeout=150)
        assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 3
        assert not temp_leftovers(scratch)
