"""DataLoader workers in a fresh process (a spawned rank), not in the test process: a worker
forked from a process with other threads (pytest-xdist's) can deadlock at start."""

import numpy as np
import pytest

from tests.helpers import run_ranks

pytestmark = pytest.mark.distributed


def bad_token_through_a_worker(rank: int, world_size: int, tmp: str) -> str:
    """The one-line error of a token id >= the vocabulary, raised in a DataLoader worker."""
    from types import SimpleNamespace

    from distributed_train.errors import UsageError
    from distributed_train.tasks.lm import LMTask
    from distributed_train.training.data import BatchPlan, TrainBatchSampler, make_loader

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
