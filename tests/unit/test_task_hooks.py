"""A task's own `optimizer(model, config)` and `scheduler(optimizer, config)`: used as written,
stepped once per optimizer step, and resumed exactly."""

import json

import pytest
import torch

from distributed_train import distributed
from distributed_train.cli.train import resolve_config
from distributed_train.errors import UsageError
from distributed_train.training.run import run_training


def _train(run_dir, steps, schedule, engine="ddp"):
    config = resolve_config(None, [f"--engine={engine}",
        "--task=tests.tasks.toy:OwnSchedule", f"--task_args.schedule={schedule}", "--train.batch_size=8",
        f"--train.max_steps={steps}", "--checkpoint.every_steps=2", "--log.every_steps=1",
        "--log.wandb=disabled", f"--run_dir={run_dir}"])
    run_training(config, distributed.DistEnv())
    lrs = [e["lr"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if e["kind"] == "train"]
    return torch.load(run_dir / "final_model.pt", weights_only=True), lrs


@pytest.mark.parametrize("schedule, expected", [
    ("step", [0.05 * 0.5 ** (step // 3) for step in range(1, 9)]),  # StepLR(3, 0.5)
    ("function", [0.05 * 0.8 ** step for step in range(1, 9)]),  # lr = f(step)
])
def test_the_tasks_schedule_is_followed_and_resumed_exactly(tmp_path, schedule, expected):
    reference, lrs = _train(tmp_path / "ref", 8, schedule)
    assert lrs == pytest.approx(expected, rel=1e-12)  # logged: the lr after each step (docs/logging.md)
    _train(tmp_path / "run", 4, schedule)
    resumed, resumed_lrs = _train(tmp_path / "run", 8, schedule)  # from the checkpoint at step 4
    assert resumed_lrs[-4:] == pytest.approx(expected[4:], rel=1e-12)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.parametrize("engine", ["fsdp", "accelerate"])
def test_every_engine_steps_and_resumes_the_tasks_schedule(tmp_path, engine):
    reference, lrs = _train(tmp_path / "ref", 6, "step", engine)
    assert lrs == pytest.approx([0.05 * 0.5 ** (step // 3) for step in range(1, 7)], rel=1e-12)
    _train(tmp_path / "run", 4, "step", engine)
    resumed, _ = _train(tmp_path / "run", 6, "step", engine)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_a_schedule_that_needs_a_metric_or_is_no_schedule_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="ReduceLROnPlateau, which needs a metric at every step"):
        _train(tmp_path / "plateau", 2, "plateau")


@pytest.mark.parametrize("schedule, message", [
    ("raises", "raised KeyError: 'warmup_iters'"),
    ("nan", "got nan"),
    ("negative", "got -0.01"),
    ("text", "got '0.05'"),
])
def test_a_schedule_function_that_fails_or_gives_no_learning_rate_is_one_line(tmp_path, schedule, message):
    """The function runs inside torch's LambdaLR at every step: what it raises or returns is the
    task's, named with the step (not a traceback through torch, not a NaN learning rate)."""
    with pytest.raises(UsageError) as failure:
        _train(tmp_path / schedule, 6, schedule)
    text = str(failure.value)
    assert text.startswith("the function task.scheduler() returned (at step 3)") and message in text, text
    assert "\n" not in text
    if schedule != "raises":
        assert "must return the learning rate, a finite number >= 0" in text


def test_a_schedule_function_may_return_a_one_element_tensor(tmp_path):
    plain, plain_lrs = _train(tmp_path / "float", 4, "function")
    tensor, tensor_lrs = _train(tmp_path / "tensor", 4, "tensor")
    assert tensor_lrs == plain_lrs and all(torch.equal(plain[k], tensor[k]) for k in plain)
