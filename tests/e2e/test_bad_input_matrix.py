"""Issue 8's bad-input matrix (README: Robustness): each mistake exits with its documented code
and one `dtrain: error:` line naming the cause and the fix; no traceback unless --debug."""

import time

import pytest

from tests.helpers import clean_env, dtrain, free_port

pytestmark = pytest.mark.slow

BAD = "--task=tests/tasks/bad8_tasks.py:"
SMALL = ["--train.batch_size=8", "--train.max_steps=4", "--log.wandb=disabled"]


def _error_lines(proc, code: int) -> list[str]:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr}"
    return [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]


def _one_error_line(proc, code: int) -> str:
    lines = _error_lines(proc, code)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_dataset_of_objects_the_collate_cannot_batch(tmp_path):
    args = ["train", BAD + "NonTensorSamples", *SMALL, f"--run_dir={tmp_path}"]
    line = _one_error_line(dtrain(*args, check=False), 2)
    assert "a training batch cannot be built: default_collate" in line and "collate(samples)" in line
    debug = dtrain(*args, "--debug", check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug keeps the traceback


def test_shape_error_in_the_first_step(tmp_path):
    line = _one_error_line(dtrain("train", BAD + "ShapeMismatch", *SMALL, f"--run_dir={tmp_path}",
                                  check=False), 2)
    assert "task.loss() failed on the first step with RuntimeError: mat1 and mat2 shapes" in line


def test_nonfinite_loss_stops_with_exit_code_3(tmp_path):
    proc = dtrain("train", BAD + "NaNLoss", "--task_args.rank=0", "--task_args.step=2", *SMALL,
                  f"--run_dir={tmp_path}", check=False)
    line = _one_error_line(proc, 3)
    assert "non-finite loss (NaN or inf) at step 2 on rank 0" in line and "train.nonfinite=skip" in line


def test_model_with_parameters_unused_in_forward(tmp_path):
    proc = dtrain("launch", "--nproc-per-node", "2", BAD + "UnusedParameter", *SMALL, f"--run_dir={tmp_path}",
                  check=False)
    line = _one_error_line(proc, 2)
    assert "(unused.weight, unused.bias)" in line and "--ddp.find_unused_parameters=true" in line


def test_rank_not_below_world_size(tmp_path):
    env = clean_env(RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    line = _one_error_line(dtrain("train", *SMALL, f"--run_dir={tmp_path}", env=env, check=False), 2)
    assert "RANK=2 must be smaller than WORLD_SIZE=2" in line


def test_unreachable_master_fails_within_the_timeout(tmp_path):
    port = free_port()  # nobody listens there
    env = clean_env(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start = time.monotonic()
    proc = dtrain("train", *SMALL, "--dist.timeout_s=2", f"--run_dir={tmp_path}", env=env, check=False)
    line = _one_error_line(proc, 4)
    assert f"rank 1 of 2 could not join the process group at 127.0.0.1:{port} within dist.timeout_s=2" in line
    assert time.monotonic() - start < 40, "took far longer than dist.timeout_s"


def test_unreachable_rendezvous_in_launch(tmp_path):
    port = free_port()
    proc = dtrain("launch", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", "join_timeout=3", *SMALL,
                  f"--run_dir={tmp_path}", check=False)
    line = _one_error_line(proc, 4)
    assert f"could not join the rendezvous at 127.0.0.1:{port}" in line and "join_timeout" in line


def test_hung_rank_is_named_and_the_job_ends_long_before_it_wakes(tmp_path):
    # Rank 1's loss sleeps 120 s at step 3; with dist.timeout_s=4 rank 0's gradient all-reduce
    # times out and names rank 1, and rank 1 (SIGTERMed by torchrun) ends itself soon after.
    start = time.monotonic()
    proc = dtrain("launch", "--nproc-per-node", "2", BAD + "SleepyLoss", "--task_args.sleep_s=120",
                  "--dist.timeout_s=4", *SMALL, f"--run_dir={tmp_path}", check=False, timeout=150)
    elapsed = time.monotonic() - start
    lines = _error_lines(proc, 4)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert any("rank 0: backward (DDP gradient all-reduce) of step 3 timed out after dist.timeout_s=4 s" in line
               and "rank 1 did not arrive: it is in task.loss() of step 3" in line for line in lines), proc.stderr
    assert elapsed < 75, f"the job took {elapsed:.0f} s; the stuck rank sleeps 120 s"


def test_a_rank_that_raises_takes_the_job_down_promptly(tmp_path):
    start = time.monotonic()
    proc = dtrain("launch", "--nproc-per-node", "2", BAD + "RaisingLoss", "--dist.timeout_s=120", *SMALL,
                  f"--run_dir={tmp_path}", check=False, timeout=150)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert "RuntimeError: simulated crash" in proc.stderr  # an unknown error keeps its traceback
    assert "rank 1 left the job in task.loss() of step 3" in proc.stderr, proc.stderr
    assert elapsed < 75, f"the job took {elapsed:.0f} s; peers must not wait for dist.timeout_s=120"
