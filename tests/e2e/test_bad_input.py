"""Bad input through the real command line: exit code 2, one line on stderr naming the key or the
task method, no traceback, no checkpoints written. World size 1 (cheap), plus two through launch.
(tests/unit covers more values of each kind in-process; each subprocess here costs `import torch`.)"""

import pytest

from tests.helpers import REPO, clean_env, dtrain

pytestmark = pytest.mark.slow

TOY = str(REPO / "tests" / "tasks" / "toy.py")
# Checkpoints on every step: if a bad run got as far as a step, it would leave one behind.
RUN = ["--train.max_steps=2", "--checkpoint.every_steps=1"]
BAD_ENV = {"WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29511"}


def assert_usage_error(proc, needle, run_dir):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("dtrain: error: ") and needle in errors[0], errors[0]
    assert not (run_dir / "checkpoints").exists()


CASES = {
    "unknown key": (["--train.lrr=0.1"], {}, "unknown config key 'train.lrr'"),
    "wrong type": (["--train.batch_size=lots"], {}, "train.batch_size must be an int; got 'lots'"),
    "zero lr": (["--train.lr=0"], {}, "train.lr must be > 0"),
    "negative steps": (["--train.max_steps=-1"], {}, "train.max_steps must be > 0"),
    "missing task file": (["--task=no/such/task.py:Task"], {}, "task file 'no/such/task.py' does not exist"),
    "missing attribute": ([f"--task={TOY}:Nope"], {}, "has no attribute 'Nope'"),
    "no loss": ([f"--task={TOY}:NoLoss"], {}, "has no loss()"),
    "no model": ([f"--task={TOY}:NoModel"], {}, "has no model()"),
    "no train_dataset": ([f"--task={TOY}:NoTrainDataset"], {}, "has no train_dataset()"),
    "empty dataset": ([f"--task={TOY}:EmptyDataset"], {}, "task.train_dataset() returned an empty dataset"),
    "nccl without cuda": (["--dist.backend=nccl"], {}, "dist.backend=nccl needs CUDA"),
    "garbage RANK": ([], {"RANK": "x", **BAD_ENV}, "RANK must be an integer, got 'x'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(tmp_path, name):
    args, env, needle = CASES[name]
    run_dir = tmp_path / "run"
    proc = dtrain("train", *RUN, f"--run_dir={run_dir}", *args, cwd=tmp_path, env=clean_env(**env),
                  check=False, timeout=120)
    assert_usage_error(proc, needle, run_dir)


def test_loss_that_is_not_a_scalar_stops_before_any_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = dtrain("train", *RUN, "--train.batch_size=16", f"--run_dir={run_dir}", f"--task={TOY}:VectorLoss",
                  cwd=tmp_path, check=False, timeout=120)
    # Found at the first step, after the "training ..." progress line: the error is the last line.
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error: ")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert "task.loss() must return a scalar tensor (the mean loss), got (16,)" in errors[0]
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("text, needle", [("train: [1, 2\n", "is not valid YAML"), (None, "does not exist")])
def test_bad_config_file(tmp_path, text, needle):
    path = tmp_path / "job.yaml"
    if text is not None:
        path.write_text(text)
    proc = dtrain("train", str(path), *RUN, cwd=tmp_path, check=False, timeout=120)
    assert_usage_error(proc, f"config file '{path}' {needle}", tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["--train.batch_size=3"], "train.batch_size (3) must be divisible by the world size (2)"),
    ([f"--task={TOY}:Nope"], "has no attribute 'Nope'"),
])
def test_launch_validates_before_spawning_workers(tmp_path, args, needle):
    run_dir = tmp_path / "run"
    proc = dtrain("launch", "--nproc-per-node", "2", f"--run_dir={run_dir}", *args, cwd=tmp_path,
                  check=False, timeout=120)
    assert_usage_error(proc, needle, run_dir)
    assert "torch.distributed.elastic" not in proc.stderr  # no worker was started
    assert not run_dir.exists()
