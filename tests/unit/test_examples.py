"""The examples a user copies stay valid: every config resolves, the example task trains."""

import pytest

from distributed_train.cli.train import resolve_config
from distributed_train.task import load_task
from tests.helpers import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)  # one GPU up to eight nodes of eight


def example_overrides(path, tmp_path) -> list[str]:
    """What an example needs to load here: language models get a small token directory."""
    if "hf_causal_lm" in path.name:
        pytest.importorskip("transformers", reason="transformers is not installed")
    if "task_args:\n  data:" not in path.read_text():
        return []
    from distributed_train.cli import prepare_tokens

    assert prepare_tokens.main([__file__, "-o", str(tmp_path / "tokens"), "--val-fraction", "0"]) == 0
    return [f"--task_args.data={tmp_path / 'tokens'}", "--task_args.seq_len=16"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_resolves_and_its_task_loads(path, tmp_path):
    config = resolve_config(str(path), example_overrides(path, tmp_path))
    task = load_task(config.task, config)
    assert task.model() is not None


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_starts_on_any_common_world_size(path, tmp_path):
    from distributed_train.batches import BatchPlan
    from distributed_train.training.data import steps_per_epoch

    config = resolve_config(str(path), example_overrides(path, tmp_path))
    train_samples = len(load_task(config.task, config).train_dataset())
    for world_size in WORLD_SIZES:
        plan = BatchPlan.make(config.train.batch_size, world_size, config.train.micro_batch_size)
        assert plan.world_size * plan.micro_batch * plan.accumulation_steps == config.train.batch_size
        assert config.eval.every_steps == 0 or (config.eval.batch_size or config.train.batch_size) >= world_size
    assert steps_per_epoch(train_samples, config.train.batch_size) >= 1


def test_example_task_learns(tmp_path):
    from distributed_train import distributed
    from distributed_train.training.run import run_training

    config = resolve_config(None, [f"--task={REPO / 'examples' / 'regression.py'}:RegressionTask",
                                   f"--run_dir={tmp_path}", "--log.wandb=disabled"])
    summary = run_training(config, distributed.DistEnv())
    assert summary["eval"]["mse"] < 0.05  # the noise floor is 0.01; an untrained model is ~8
