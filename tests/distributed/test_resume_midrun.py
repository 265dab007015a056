"""Resume where it can fail: stopped mid-run by a real SIGTERM (not "finish, then extend"), with a
cosine schedule after warmup, Adam moments, dropout and Python/NumPy randomness in the loss."""

import pytest
import torch

from tests.helpers import TASKS, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

NOISY = f"{TASKS}/noisy.py:NoisyRegression"
STEPS = 60  # 10 epochs of 6 steps (96 samples, global batch 16)
ARGS = [f"--task={NOISY}", "--train.batch_size=16", f"--train.max_steps={STEPS}", "--train.lr=0.05",
        "--train.schedule=cosine", "--train.warmup_steps=5", "--train.min_lr=0.001", "--log.every_steps=4",
        "--checkpoint.every_steps=100", "--log.wandb=disabled"]


def stopped_by_sigterm(rank: int, world_size: int, run_dir: str, stop_at: int) -> dict:
    """A run that SIGTERMs itself inside step `stop_at`: the step it stopped at, the checkpoints."""
    import os
    from pathlib import Path

    from distributed_train import distributed
    from distributed_train.cli.train import resolve_config
    from distributed_train.distributed import preemption
    from distributed_train.distributed.preemption import Preempted
    from distributed_train.training.checkpoints.commit import committed_checkpoints
    from distributed_train.training.run import run_training

    # A vote at every step boundary (not every ~50 ms): the stop step is the same on any machine.
    preemption.StopFlag._propose_interval = lambda self, step: 1
    os.environ["NOISY_STOP_AT_STEP"] = str(stop_at)  # not a config key: the resume must see the same config
    config = resolve_config(None, [*ARGS, f"--run_dir={run_dir}"])
    try:
        run_training(config, distributed.read_env())
    except Preempted as exc:
        return {"stopped_at": exc.step,
                "checkpoints": [p.name for p in committed_checkpoints(Path(run_dir) / "checkpoints")]}
    return {"stopped_at": None}


def test_sigterm_mid_run_resumes_bit_identical_with_cosine_adam_and_all_rngs(tmp_path):
    reference = run_ranks(train_in_rank, 2, [*ARGS, f"--run_dir={tmp_path / 'ref'}"])[0]
    stopped = run_ranks(stopped_by_sigterm, 2, str(tmp_path / "run"), 9)
    # Both ranks stopped after the same step, agreed at the vote after the signal in step 9: well
    # before the end (mid-cosine) and mid-epoch (6 steps per epoch); that step was committed, so no
    # completed step was lost.
    step = stopped[0]["stopped_at"]
    assert [s["stopped_at"] for s in stopped] == [step, step] and 9 <= step <= 11 and step % 6, stopped
    assert stopped[0]["checkpoints"] == [f"step-{step:08d}"]
    resumed = run_ranks(train_in_rank, 2, [*ARGS, f"--run_dir={tmp_path / 'run'}"])[0]
    assert resumed["summary"]["resumed_from"].endswith(f"step-{step:08d}")
    assert resumed["summary"]["global_step"] == STEPS == reference["summary"]["global_step"]
    different = [k for k in reference["state"] if not torch.equal(resumed["state"][k], reference["state"][k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"
    assert resumed["summary"]["train_loss"] == reference["summary"]["train_loss"]
