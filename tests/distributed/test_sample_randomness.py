"""Random augmentations in `__getitem__` survive a kill and a resume on another world size with
other DataLoader workers: the result equals one uninterrupted process."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from distributed_train.training.checkpoint import committed_checkpoints
from tests.helpers import run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

# 96 samples, global batch 12: 8 steps per epoch; the kill falls mid-epoch 1, the run ends in epoch 2.
COMMON = ["--task=tests.tasks.augment:AugmentTask", "--train.batch_size=12", "--train.lr=0.01",
          "--log.every_steps=5", "--checkpoint.every_steps=5", "--train.max_steps=20"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_ranks_two_workers_killed_then_three_ranks_no_workers_equals_one_process(tmp_path):
    run_dir = tmp_path / "run"
    with ThreadPoolExecutor(2) as pool:  # the reference and the first run side by side: spawning is slow
        reference = pool.submit(run_ranks, train_in_rank, 1, [*COMMON, f"--run_dir={tmp_path / 'ref'}"])
        pool.submit(run_ranks, train_in_rank, 2, [*COMMON, f"--run_dir={run_dir}", "--train.max_steps=14",
                                                  "--data.num_workers=2"]).result()
        reference = reference.result()[0]
    # A kill after step 14 leaves step 10 as the last commit: the samples of steps 11-14 were
    # drawn once already and must be drawn again the same way.
    newest = committed_checkpoints(run_dir / "checkpoints")[-1]
    assert newest.name.endswith("14")
    shutil.rmtree(newest)
    resumed = run_ranks(train_in_rank, 3, [*COMMON, f"--run_dir={run_dir}", "--data.num_workers=0"])[0]

    assert resumed["summary"]["resumed_from"].endswith("step-00000010")
    assert resumed["summary"]["global_step"] == 20 and resumed["summary"]["world_size"] == 3
    assert _max_diff(resumed["state"], reference["state"]) <= 1e-5
    assert abs(resumed["summary"]["eval"]["loss"] - reference["summary"]["eval"]["loss"]) <= 1e-5
