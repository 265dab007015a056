"""Mechanisms that comparing parameters cannot see: the all-reduce count under gradient
accumulation, and every rank writing to rank 0's run directory."""

from pathlib import Path

import pytest

from tests.helpers import TASKS, run_ranks

pytestmark = pytest.mark.distributed

STEPS, ACCUMULATION = 5, 3


def count_all_reduces(rank: int, world_size: int, tmp: str) -> dict:
    """Train with accumulation through the backend's own all-reduce, counting the DDP comm-hook
    calls; each rank names its own run_dir (only rank 0's may be used)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from distributed_train import distributed
    from distributed_train.cli.train import resolve_config
    from distributed_train.training import trainer
    from distributed_train.training.run import run_training

    buckets: list[int] = []

    def counting_hook(state, bucket):
        buckets.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    build_engine = trainer.build_engine

    def build_and_count(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        engine.model.register_comm_hook(state=None, hook=counting_hook)
        return engine

    trainer.build_engine = build_and_count
    config = resolve_config(None, [
        f"--task={TASKS}/toy.py:Regression", "--train.batch_size=24", "--train.micro_batch_size=4",
        f"--train.max_steps={STEPS}", "--ddp.shm_allreduce=never", "--log.wandb=disabled",
        f"--run_dir={tmp}/rank{rank}"])
    summary = run_training(config, distributed.read_env())
    return {"buckets": buckets, "run_dir": str(Path(summary["final_model"]).parent)}


def test_one_all_reduce_per_bucket_per_step_and_every_rank_uses_rank_0s_run_dir(tmp_path):
    results = run_ranks(count_all_reduces, 2, str(tmp_path))
    for result in results:
        per_step = max(result["buckets"]) + 1
        # no_sync on the first ACCUMULATION - 1 micro-steps: one all-reduce per bucket per step
        assert len(result["buckets"]) == STEPS * per_step, result["buckets"]
        assert result["run_dir"] == str(tmp_path / "rank0")
    assert (tmp_path / "rank0" / "final_model.pt").is_file() and not (tmp_path / "rank1").exists()
