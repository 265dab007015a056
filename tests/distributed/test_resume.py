"""Exact resume: same world size is bit-identical, another world size continues the same samples."""

import pytest
import torch

from tests.helpers import EXACT, FP64, max_diff, run_jobs, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

# Global batch 48 divides over 1..4 ranks; 31 steps per epoch, so step 20 is mid-epoch and the
# run crosses an epoch boundary after the resume.
COMMON = ["--train.batch_size=48", "--log.every_steps=5", "--checkpoint.every_steps=10"]


def _job(run_dir, steps: int, *extra: str) -> list[str]:
    return [*COMMON, f"--run_dir={run_dir}", f"--train.max_steps={steps}", *extra]


def _train(world_size: int, run_dir, steps: int, *extra: str) -> dict:
    return run_ranks(train_in_rank, world_size, _job(run_dir, steps, *extra))[0]


def test_resume_same_world_size_is_bit_identical_and_other_sizes_within_tolerance(tmp_path):
    # The gradients go through shared memory ("require": no silent fall back) or the backend's
    # own all-reduce ("never"); at 2 ranks the two are bitwise equal, so "same" checks both.
    # Every job in float64: the other world sizes are compared with the reference (helpers.EXACT).
    resume = f"--checkpoint.resume={tmp_path}/stopped/checkpoints/step-00000020"
    two = run_jobs(2, [("reference", _job(tmp_path / "ref", 40, FP64, "--ddp.shm_allreduce=require")),
                       ("stopped", _job(tmp_path / "stopped", 20, FP64, "--ddp.shm_allreduce=require")),
                       ("same", _job(tmp_path / "same", 40, FP64, resume, "--ddp.shm_allreduce=never"))])
    reference, same = two["reference"], two["same"]
    assert two["stopped"]["summary"]["global_step"] == 20
    assert same["summary"]["resumed_from"].endswith("step-00000020")
    assert all(torch.equal(same["state"][k], reference["state"][k]) for k in reference["state"])

    others = {1: _train(1, tmp_path / "one", 40, FP64, resume),
              3: _train(3, tmp_path / "three", 40, FP64, resume, "--ddp.shm_allreduce=require"),
              4: _train(4, tmp_path / "four", 40, FP64, resume, "--ddp.shm_allreduce=never")}
    for world_size, other in others.items():
        summary = other["summary"]
        assert summary["resumed_from"].endswith("step-00000020"), world_size
        assert (summary["world_size"], summary["global_step"]) == (world_size, 40)
        assert max_diff(other["state"], reference["state"]) <= EXACT, world_size


def test_resume_with_dataloader_workers_and_accumulation_is_bit_identical(tmp_path):
    extra = ["--data.num_workers=1", "--train.micro_batch_size=8"]
    runs = run_jobs(2, [("reference", _job(tmp_path / "ref", 25, *extra)),
                        # stops between checkpoints: step 13 is committed at the end
                        ("stopped", _job(tmp_path / "run", 13, *extra)),
                        ("resumed", _job(tmp_path / "run", 25, *extra))])
    reference, resumed = runs["reference"], runs["resumed"]
    assert resumed["summary"]["resumed_from"].endswith("step-00000013")
    assert all(torch.equal(resumed["state"][k], reference["state"][k]) for k in reference["state"])
