"""The examples a user copies stay valid: every config resolves, the example task trains."""

import pytest

from distributed_train.cli.train import resolve_config
from distributed_train.task import load_task
from tests.helpers import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_resolves_and_its_task_loads(path):
    config = resolve_config(str(path), [])
    task = load_task(config.task, config)
    assert task.model() is not None


def test_example_task_learns(tmp_path):
    from distributed_train import dist
    from distributed_train.training.run import run_training

    config = resolve_config(None, [f"--task={REPO / 'examples' / 'regression.py'}:RegressionTask",
                                   f"--run_dir={tmp_path}", "--log.wandb=disabled"])
    summary = run_training(config, dist.DistEnv())
    assert summary["eval"]["mse"] < 0.05  # the noise floor is 0.01; an untrained model is ~8
