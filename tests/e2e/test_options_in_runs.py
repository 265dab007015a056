"""Behaviours that only a command shows, as a user runs it: what `dtrain launch` gives its workers
(threads, flushed denormals), wandb falling back to offline when online init fails, the rate
fields of real events (tokens_per_s, mfu, stall_s), exit 3 through `dtrain launch`,
`checkpoint.on_sigterm=false`, and `dtrain doctor`'s exit 4."""

import json
import signal
import subprocess
import sys

import pytest

from distributed_train.config import load_config
from distributed_train.distributed import cpu_count
from distributed_train.tasks.charlm import CharLMTask
from distributed_train.training.checkpoints.commit import committed_checkpoints
from distributed_train.training.reporting.metrics import read_events
from tests.e2e.test_wandb import read_offline_run
from tests.helpers import TASKS, clean_env, dtrain, free_port

pytestmark = pytest.mark.slow

CHARLM = ["--task_args.n_layer=1", "--task_args.d_model=32", "--task_args.n_head=2", "--task_args.ctx=16"]
PEAK_TFLOPS = 0.5


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dtrain: error:")]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """One worker under `dtrain launch` (no OMP_NUM_THREADS given) training a small charlm with a
    peak for mfu, checkpoints, and log.wandb=online against a server that refuses connections."""
    tmp = tmp_path_factory.mktemp("probe")
    env = clean_env(HOME=str(tmp / "home"), WANDB_API_KEY="k" * 40, WANDB_INIT_TIMEOUT="1",
                    WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}")  # nobody listens there
    env.pop("WANDB_MODE")
    assert "OMP_NUM_THREADS" not in env  # conftest clears the caller's
    proc = dtrain("launch", "--nproc-per-node", "1", f"--task={TASKS}/options_probe.py:charlm_probe", *CHARLM,
                  "--train.batch_size=16", "--train.max_steps=4", "--log.every_steps=2", "--eval.max_samples=32",
                  "--checkpoint.every_steps=2", f"--log.peak_tflops={PEAK_TFLOPS}", "--log.wandb=online",
                  f"--run_dir={tmp / 'run'}", env=env, timeout=120)
    return proc, tmp / "run"


def test_launch_gives_its_worker_the_cores_and_flushes_denormals(probe_run):
    _, run_dir = probe_run
    seen = json.loads((run_dir / "probe-rank0.json").read_text())
    # cores / workers (one worker here), set by `dtrain launch`: torchrun alone sets nothing for one
    # worker, and 1 thread each for several
    threads = cpu_count()
    assert seen["world_size"] == 1 and seen["OMP_NUM_THREADS"] == str(threads), seen
    assert seen["torch_threads"] == threads, seen
    assert seen["denormals_flushed"], "train.flush_denormal (on by default) was not applied in the worker"


def test_wandb_online_failure_falls_back_to_offline(probe_run):
    proc, run_dir = probe_run
    assert "wandb.init(mode=online) failed:" in proc.stderr, proc.stderr
    assert f"logging to wandb offline; sync later with `wandb sync {run_dir}/wandb/offline-run-*`" in proc.stderr
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    logged = read_offline_run(offline)
    assert logged["steps"] == [2, 4], logged
    start = read_events(run_dir)[0]
    assert start["kind"] == "start" and start["wandb_id"] == logged["id"]


def test_rate_fields_of_real_events(probe_run):
    _, run_dir = probe_run
    events = read_events(run_dir)
    train = [e for e in events if e["kind"] == "train"]
    assert [e["step"] for e in train] == [2, 4]
    flops = CharLMTask(load_config(None, ["--task=charlm", *CHARLM])).flops_per_sample()
    for event in train:
        assert event["tokens_per_s"] == pytest.approx(event["samples_per_s"] * 16), event  # ctx tokens a sample
        # docs/logging.md: FLOPs per sample x samples/s / (peak x devices), with log.peak_tflops
        assert event["mfu"] == pytest.approx(flops * event["samples_per_s"] / (PEAK_TFLOPS * 1e12)), event
        assert 0 < event["mfu"] < 1
    checkpoints = [e for e in events if e["kind"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [2, 4]
    wall_s = json.loads((run_dir / "summary.json").read_text())["wall_s"]
    assert all(0 < e["stall_s"] < wall_s for e in checkpoints), checkpoints  # the copy to CPU, not the write
    assert [p.name for p in committed_checkpoints(run_dir / "checkpoints")] == ["step-00000002", "step-00000004"]


def test_nonfinite_loss_through_launch_exits_3_with_the_workers_line(tmp_path):
    proc = dtrain("launch", f"--task={TASKS}/broken_tasks.py:NaNLoss", "--task_args.rank=1", "--task_args.step=2",
                  "--train.batch_size=8", "--train.max_steps=4", "--log.wandb=disabled", f"--run_dir={tmp_path}",
                  check=False)
    assert proc.returncode == 3, proc.stderr
    # Two workers by default; rank 0 says why, once, and launch adds no "worker rank N exited" line.
    assert _error_lines(proc.stderr) == [_error_lines(proc.stderr)[0]]
    line = _error_lines(proc.stderr)[0]
    assert "non-finite loss (NaN or inf) at step 2 on rank 1" in line and "train.nonfinite=skip" in line
    assert "dtrain launch: worker rank" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_on_sigterm_false_lets_sigterm_end_the_run_without_a_checkpoint(tmp_path):
    # The task SIGTERMs its own process at its 3rd step; on_sigterm=true would commit step 3 and exit 143.
    proc = subprocess.run([sys.executable, "-m", "distributed_train", "train",
                           f"--task={TASKS}/fault_tasks.py:StopsItself", "--task_args.rank=0",
                           "--task_args.signal=SIGTERM", "--task_args.step=3", "--checkpoint.on_sigterm=false",
                           "--train.batch_size=8", "--train.max_steps=50", "--log.wandb=disabled",
                           f"--run_dir={tmp_path}"], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, f"exit {proc.returncode}\n{proc.stderr}"
    assert committed_checkpoints(tmp_path / "checkpoints") == []
    assert not (tmp_path / "summary.json").exists() and "committed" not in proc.stderr, proc.stderr


def test_doctor_exits_4_when_rank_0_cannot_be_reached(tmp_path):
    port = free_port()  # nobody listens there
    env = clean_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))
    proc = dtrain("doctor", "--timeout-s", "1", env=env, check=False, cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert f"rank 1 of 2 could not join the process group at 127.0.0.1:{port}" in line, line
    assert "within --timeout-s=1 s" in line, line  # the option doctor takes, not the training key
    assert "Traceback" not in proc.stderr and "verdict" not in proc.stdout
