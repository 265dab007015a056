"""Signals end to end: Ctrl-C stops like SIGTERM (exit 130, a checkpoint, no traceback), a second
Ctrl-C aborts at once, SIGHUP stops like SIGTERM (exit 129), and workers never outlive a
`dtrain launch` that was SIGKILLed."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distributed_train.training.checkpoints.commit import committed_checkpoints
from tests.helpers import clean_env

pytestmark = pytest.mark.slow

LONG = ["--train.max_steps=100000", "--log.every_steps=10", "--log.wandb=disabled", "--eval.every_steps=0"]


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    """The job, with TMPDIR in the test's folder: a launcher these tests SIGKILL cannot remove its
    temporary folder."""
    return subprocess.Popen([sys.executable, "-m", "distributed_train", *args, *LONG, f"--run_dir={run_dir}"],
                            env=clean_env(TMPDIR=str(run_dir.parent)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _wait_for_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 90) -> None:
    """Until a train event is logged (every rank is inside the loop)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and any(json.loads(line).get("kind") == "train"
                                         for line in metrics.read_text().splitlines() if line.strip())):
        assert proc.poll() is None, f"run ended early:\n{proc.communicate()}"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"did not stop:\n{proc.communicate()}") from None
    return proc.returncode, err


def test_ctrl_c_commits_a_checkpoint_and_exits_130_and_a_second_one_aborts(tmp_path):
    proc = _start(tmp_path / "once", "train")
    _wait_for_training(proc, tmp_path / "once")
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    assert code == 130, err
    assert "Traceback" not in err and "stopped by SIGINT after step" in err and "rerun the same command" in err
    assert len(committed_checkpoints(tmp_path / "once" / "checkpoints")) == 1

    proc = _start(tmp_path / "twice", "train", "--checkpoint.on_sigterm=true")
    _wait_for_training(proc, tmp_path / "twice")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    assert code == 130, err
    assert "Traceback" not in err


def test_ctrl_c_to_the_launcher_stops_every_worker_with_a_checkpoint(tmp_path):
    proc = _start(tmp_path, "launch", "--nproc-per-node", "2")
    _wait_for_training(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    assert code == 130, err
    assert "Traceback" not in err and "rerun the same command" in err
    assert len(committed_checkpoints(tmp_path / "checkpoints")) == 1


@pytest.mark.parametrize("command", [["train"], ["launch", "--nproc-per-node", "2"]])
def test_sighup_commits_a_checkpoint_and_exits_129_like_sigterm(tmp_path, command):
    """A closed terminal or a dropped ssh session (torchrun forwards the SIGHUP to its workers)."""
    proc = _start(tmp_path, *command)
    _wait_for_training(proc, tmp_path)
    proc.send_signal(signal.SIGHUP)
    code, err = _finish(proc)
    assert code == 129, err
    assert "Traceback" not in err and "SIGHUP" in err and "rerun the same command" in err
    assert len(committed_checkpoints(tmp_path / "checkpoints")) == 1


def test_workers_stop_when_the_launcher_is_sigkilled(tmp_path):
    proc = _start(tmp_path, "launch", "--nproc-per-node", "2")
    _wait_for_training(proc, tmp_path)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train" in p.cmdline()]
    assert len(workers) == 2 and all(w.ppid() == proc.pid for w in workers), \
        "torchrun's workers are children of the launcher process itself"
    proc.kill()
    proc.communicate()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived the launcher: {[w.pid for w in alive]}"
