"""DataLoader workers in a fresh process (a spawned rank), not in the test process: a worker
forked from a process with other threads (pytest-xdist's) can deadlock at start."""

import numpy as np
import pytest
import torch

from tests.helpers import REPO, jobs_in_rank, run_ranks

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
                 "forkserver": ["--data.num_workers=1", "--data.worker_start_method=forkserver"],
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
    # A task loaded from its file pickles into workers that start from a fresh interpreter, and
    # its random augmentation draws what it draws in the training process (seeded per sample).
    rank0, rank1 = run_ranks(jobs_with_start_methods, 2, str(tmp_path), timeout=180)
    assert rank0["start_methods"] == rank1["start_methods"] == [None, "forkserver", "spawn"]
    reference = rank0["results"]["in-process"]
    for name in ("forkserver", "spawn"):
        state = rank0["results"][name]["state"]
        assert all(torch.equal(state[k], reference["state"][k]) for k in reference["state"]), name
        assert rank0["results"][name]["summary"]["train_loss"] == reference["summary"]["train_loss"], name
