"""Fault tolerance end to end: SIGKILL of a worker, SIGTERM of the launcher, a damaged checkpoint.

Each scenario must end with a final model bit-identical to an uninterrupted run.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from distributed_train.training.checkpoints.commit import committed_checkpoints
from tests.helpers import clean_env, dtrain

pytestmark = pytest.mark.slow

STEPS = 700
ARGS = ["--nproc-per-node", "2", f"--train.max_steps={STEPS}", "--checkpoint.every_steps=50",
        "--log.every_steps=100", "--log.wandb=disabled"]


def _launch(run_dir: Path, *extra: str, args: list[str] = ARGS) -> subprocess.Popen:
    """`dtrain launch` of `args` and `extra` into `run_dir`, in the background."""
    return subprocess.Popen([sys.executable, "-m", "distributed_train", "launch", *args, *extra,
                             f"--run_dir={run_dir}"], env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not committed_checkpoints(run_dir / "checkpoints"):
        assert proc.poll() is None, f"run ended before its first checkpoint:\n{proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"run did not finish\nstdout:\n{out}\nstderr:\n{err}") from None
    return proc.returncode, out, err


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"


def _kill_a_worker_and_finish(proc: subprocess.Popen, run_dir: Path) -> dict:
    """SIGKILL one of the 2 workers of a `--max-restarts` launch after its first checkpoint; the
    job must restart, resume from a checkpoint and finish. Returns its summary."""
    _wait_for_checkpoint(proc, run_dir)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "distributed_train" in " ".join(p.cmdline()) and "train" in p.cmdline()]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[1].send_signal(signal.SIGKILL)
    code, out, err = _finish(proc)
    assert code == 0, err
    assert "resuming from" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"], summary
    return summary


def _assert_goodput(summary: dict, attempts: int) -> dict:
    """The summary's goodput breakdown covers every attempt and adds up to its wall time."""
    from distributed_train.training.reporting.goodput import CATEGORIES

    parts = summary["goodput"]
    assert parts["attempts"] == attempts, parts
    assert sum(parts[k] for k in CATEGORIES) == pytest.approx(parts["wall_s"], abs=0.01), parts
    assert min(parts[k] for k in CATEGORIES) >= 0 and 0 < parts["goodput"] < 1, parts
    assert parts["productive"] > 0 and parts["startup"] > 0 and parts["checkpoint"] > 0, parts
    return parts


def _sigterm_after_a_checkpoint(proc: subprocess.Popen, run_dir: Path, steps: int) -> Path:
    """SIGTERM a launch after its first checkpoint: it commits one more and exits 143 before step
    `steps`. Returns that newest checkpoint."""
    _wait_for_checkpoint(proc, run_dir)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM: committed" in err
    newest = committed_checkpoints(run_dir / "checkpoints")[-1]
    assert 0 < int(newest.name.split("-")[1]) < steps, newest
    return newest


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("reference")
    dtrain("launch", *ARGS, f"--run_dir={run_dir}", timeout=180)
    return _final(run_dir)


def test_sigkill_of_a_worker_restarts_and_resumes_bit_identical(tmp_path, reference):
    run_dir = tmp_path / "run"
    summary = _kill_a_worker_and_finish(_launch(run_dir, "--max-restarts", "2"), run_dir)
    assert summary["global_step"] == STEPS
    # The steps after the checkpoint the restart resumed from were done twice: lost work, as far as
    # the killed attempt recorded them (a kill before its next record leaves it all in "between",
    # with the restart itself: torchrun noticing, starting new workers).
    parts = _assert_goodput(summary, attempts=2)
    assert parts["lost"] + parts["between"] > 0 and parts["restore"] > 0, parts
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "end" and events[-1]["goodput"]["attempts"] == 2, events[-1]
    _assert_identical(_final(run_dir), reference)


def test_an_attempt_that_died_before_recording_anything_is_in_the_wall_time(tmp_path):
    """The launch's first attempt dies in model() after 1.5 s; torchrun's restart trains. The
    job's wall time starts at the command, so those seconds count (as `between`)."""
    run_dir = tmp_path / "run"
    task = f"--task={Path(__file__).parents[1] / 'tasks' / 'fault_tasks.py'}:DiesOnFirstAttempt"
    code, out, err = _finish(_launch(run_dir, "--max-restarts", "1", args=[
        "--nproc-per-node", "1", task, "--train.max_steps=20", "--log.wandb=disabled"]))
    assert code == 0, err
    (start,) = [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if e.get("kind") == "start"]
    assert start["attempt_t0"] - start["command_t0"] >= 1.5, start  # the restart's own start, later
    parts = json.loads((run_dir / "summary.json").read_text())["goodput"]
    assert parts["attempts"] == 1 and parts["between"] >= 1.5, parts
    assert parts["wall_s"] >= start["time"] - start["command_t0"], (parts, start)


def test_sigterm_checkpoints_then_rerun_resumes_and_damaged_checkpoint_falls_back(tmp_path, reference):
    run_dir = tmp_path / "run"
    newest = _sigterm_after_a_checkpoint(_launch(run_dir), run_dir, STEPS)
    stopped_at = int(newest.name.split("-")[1])
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    # The fallback must be an earlier checkpoint, not a start from scratch (which would also end
    # bit-identical): the first checkpoint (step 50) is committed before the SIGTERM is sent.
    committed = committed_checkpoints(damaged / "checkpoints")
    assert len(committed) >= 2 and committed[-1].name == newest.name, committed
    previous = committed[-2]
    previous_step = int(previous.name.split("-")[1])
    assert 0 < previous_step < stopped_at, (previous, newest)

    # Rerun the same command: resumes at the SIGTERM step, ends bit-identical.
    code, out, err = _finish(_launch(run_dir))
    assert code == 0, err
    assert f"resuming from {newest}" in err
    _assert_identical(_final(run_dir), reference)
    # A SIGTERM checkpoint of the last step loses nothing; the pause until the rerun is between.
    parts = _assert_goodput(json.loads((run_dir / "summary.json").read_text()), attempts=2)
    assert parts["lost"] == 0 and parts["between"] > 0 and parts["restore"] > 0, parts

    # Truncate the newest checkpoint's largest file: one warning, fall back, still bit-identical.
    state = max((damaged / "checkpoints" / newest.name).iterdir(), key=lambda p: p.stat().st_size)
    with open(state, "r+b") as f:
        f.truncate(state.stat().st_size // 3)
    code, out, err = _finish(_launch(damaged))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "skipping damaged checkpoint" in line]
    assert len(warnings) == 1 and newest.name in warnings[0], err
    assert f"resuming from {previous} (step {previous_step}," in err, err
    summary = json.loads((damaged / "summary.json").read_text())
    assert summary["resumed_from"] == str(previous) and summary["global_step"] == STEPS, summary
    events = [json.loads(line) for line in (damaged / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.get("kind") == "start"]
    assert [(e["step"], e["resumed"]) for e in starts] == [(0, False), (previous_step, True)], starts
    _assert_identical(_final(damaged), reference)


def test_a_sigterm_checkpoint_that_would_not_fit_the_grace_period_is_not_started(tmp_path, reference):
    """checkpoint.grace_s: judged by this attempt's last save, a stop checkpoint that would outlast
    it is not started (a scheduler would kill it half-written); the last committed one stands and
    the rerun resumes from it, bit-identical."""
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "--checkpoint.grace_s=0.001")
    _wait_for_checkpoint(proc, run_dir)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "more than the 0.0 s left of checkpoint.grace_s=0.001; not saved" in err, err
    assert "SIGTERM: committed" not in err and "; rerun the same command to continue" in err, err
    newest = committed_checkpoints(run_dir / "checkpoints")[-1]
    code, out, err = _finish(_launch(run_dir))
    assert code == 0 and f"resuming from {newest}" in err, err
    _assert_identical(_final(run_dir), reference)
