"""Random augmentations in `__getitem__` survive a kill and a resume on another world size with
other DataLoader workers: the result equals one uninterrupted process."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from distributed_train.training.checkpoints.commit import committed_checkpoints
from tests.helpers import EXACT, FP64, max_diff, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

# 96 samples, global batch 12: 8 steps per epoch; the kill falls mid-epoch 1, the run ends in epoch 2.
# In float64: 3 ranks are compared with one process (helpers.EXACT).
COMMON = [FP64, "--task=tests.tasks.augment:AugmentTask", "--train.batch_size=12", "--train.lr=0.01",
          "--log.every_steps=5", "--checkpoint.every_steps=5", "--train.max_steps=20"]


def train_then_kill_rank_1(rank: int, world_size: int, overrides: list[str], step: int) -> dict:
    """train_in_rank, but rank 1 SIGKILLs itself in training step `step`."""
    from tests.tasks import augment

    augment.KILL_AT_STEP = step if rank == 1 else None
    return train_in_rank(rank, world_size, overrides)


def test_two_ranks_two_workers_killed_then_three_ranks_no_workers_equals_one_process(tmp_path):
    run_dir = tmp_path / "run"
    # The same task, able to kill itself (only where a rank sets KILL_AT_STEP); a resume needs the same task.
    killable = [*COMMON, "--task=tests.tasks.augment:KilledAugmentTask", f"--run_dir={run_dir}"]
    with ThreadPoolExecutor(2) as pool:  # the reference and the killed run side by side: spawning is slow
        reference = pool.submit(run_ranks, train_in_rank, 1, [*COMMON, f"--run_dir={tmp_path / 'ref'}"])
        # Rank 1 is SIGKILLed in step 14 (mid-epoch 1): rank 0, waiting for it there, says so,
        # unless the test notices rank 1's death first.
        with pytest.raises(AssertionError, match=r"rank 0: .* of step 14 failed \(rank 1 |rank 1 exited with -9"):
            run_ranks(train_then_kill_rank_1, 2, [*killable, "--data.num_workers=2"], 14, timeout=120)
        reference = reference.result()[0]
    # The kill landed mid-run: no final model; the last commit is step 10, or step 5 when step
    # 10's background write had not finished. The samples drawn since must be drawn again alike.
    assert not (run_dir / "final_model.pt").exists()
    newest = committed_checkpoints(run_dir / "checkpoints")[-1].name
    assert newest in ("step-00000005", "step-00000010"), newest
    resumed = run_ranks(train_in_rank, 3, [*killable, "--data.num_workers=0"])[0]

    assert resumed["summary"]["resumed_from"].endswith(newest)
    assert resumed["summary"]["global_step"] == 20 and resumed["summary"]["world_size"] == 3
    assert max_diff(resumed["state"], reference["state"]) <= EXACT
    assert resumed["summary"]["eval"]["loss"] == pytest.approx(reference["summary"]["eval"]["loss"], rel=EXACT)
