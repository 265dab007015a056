"""Per-step reseeding: randomness depends on (seed, rank, step) only, so a resume replays dropout."""

import torch

from distributed_train import distributed
from distributed_train.cli.train import resolve_config
from distributed_train.training.rng import reseed_step
from distributed_train.training.run import run_training

CPU = torch.device("cpu")


def test_reseed_step_is_deterministic_and_history_free():
    reseed_step(0, 1, 5, CPU)
    first = torch.rand(4)
    torch.rand(100)  # whatever happened before must not matter
    reseed_step(0, 1, 5, CPU)
    assert torch.equal(torch.rand(4), first)
    reseed_step(0, 0, 5, CPU)
    assert not torch.equal(torch.rand(4), first)  # another rank draws another mask


def _charlm_with_dropout(run_dir, steps):
    config = resolve_config(None, [
        "--task=charlm", "--task_args.n_layer=1", "--task_args.d_model=32", "--task_args.n_head=2",
        "--task_args.ctx=16", "--task_args.dropout=0.2", "--train.batch_size=8",
        f"--train.max_steps={steps}", "--checkpoint.every_steps=3", "--log.wandb=disabled",
        "--eval.batch_size=4096", f"--run_dir={run_dir}"])
    run_training(config, distributed.DistEnv())
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def test_resume_with_dropout_is_bit_identical(tmp_path):
    reference = _charlm_with_dropout(tmp_path / "ref", 7)
    _charlm_with_dropout(tmp_path / "run", 3)
    resumed = _charlm_with_dropout(tmp_path / "run", 7)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
