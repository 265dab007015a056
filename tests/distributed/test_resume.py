"""Exact resume: same world size is bit-identical, another world size continues the same samples."""

import shutil

import pytest
import torch

from tests.helpers import run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

# Global batch 48 divides over 1..4 ranks; 31 steps per epoch, so step 20 is mid-epoch and the
# run crosses an epoch boundary after the resume.
COMMON = ["--train.batch_size=48", "--log.every_steps=5", "--checkpoint.every_steps=10"]


def _train(world_size: int, run_dir, steps: int, *extra: str) -> dict:
    results = run_ranks(train_in_rank, world_size,
                        [*COMMON, f"--run_dir={run_dir}", f"--train.max_steps={steps}", *extra])
    return results[0]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_resume_same_world_size_is_bit_identical_and_other_sizes_within_tolerance(tmp_path):
    reference = _train(2, tmp_path / "ref", 40)
    _train(2, tmp_path / "stopped", 20)
    for name in ("same", "one", "three"):
        shutil.copytree(tmp_path / "stopped", tmp_path / name)

    same = _train(2, tmp_path / "same", 40)
    assert same["summary"]["resumed_from"].endswith("step-00000020")
    assert all(torch.equal(same["state"][k], reference["state"][k]) for k in reference["state"])

    one = _train(1, tmp_path / "one", 40)
    three = _train(3, tmp_path / "three", 40)
    for other in (one, three):
        assert other["summary"]["resumed_from"].endswith("step-00000020")
        assert other["summary"]["global_step"] == 40
        assert _max_diff(other["state"], reference["state"]) <= 1e-5


def test_resume_with_dataloader_workers_and_accumulation_is_bit_identical(tmp_path):
    extra = ["--data.num_workers=1", "--train.micro_batch_size=8"]
    reference = _train(2, tmp_path / "ref", 25, *extra)
    _train(2, tmp_path / "run", 13, *extra)  # stops between checkpoints: step 13 is committed at the end
    resumed = _train(2, tmp_path / "run", 25, *extra)
    assert resumed["summary"]["resumed_from"].endswith("step-00000013")
    assert all(torch.equal(resumed["state"][k], reference["state"][k]) for k in reference["state"])
