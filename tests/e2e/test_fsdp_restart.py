"""engine=fsdp end to end: SIGKILL of a worker under --max-restarts, and SIGTERM (the ranks agree on
the step, save their shards together, and a rerun continues), both bit-identical to an
uninterrupted run; `dtrain export` of the last checkpoint equals final_model.pt."""

import json
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from distributed_train.training.checkpoint import committed_checkpoints
from tests.e2e.test_fault_tolerance import _assert_identical, _final, _finish, _wait_for_checkpoint
from tests.helpers import clean_env, dtrain

pytestmark = pytest.mark.slow

STEPS = 300
ARGS = ["--nproc-per-node", "2", "--engine=fsdp", f"--train.max_steps={STEPS}", "--checkpoint.every_steps=50",
        "--log.every_steps=100", "--log.wandb=disabled"]


def _launch(run_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "distributed_train", "launch", *ARGS, *extra,
                             f"--run_dir={run_dir}"], env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def test_fsdp_survives_sigkill_and_sigterm_bit_identical(tmp_path):
    reference_dir = tmp_path / "reference"
    dtrain("launch", *ARGS, f"--run_dir={reference_dir}", timeout=180)
    reference = _final(reference_dir)

    # `dtrain export` of the last committed checkpoint is the final model.
    dtrain("export", str(reference_dir), "-o", str(tmp_path / "exported.pt"))
    _assert_identical(torch.load(tmp_path / "exported.pt", weights_only=True), reference)

    killed = tmp_path / "killed"
    proc = _launch(killed, "--max-restarts", "2")
    _wait_for_checkpoint(proc, killed)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "distributed_train" in " ".join(p.cmdline()) and "train" in p.cmdline()]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[1].send_signal(signal.SIGKILL)
    code, out, err = _finish(proc)
    assert code == 0, err
    assert "resuming from" in err
    assert json.loads((killed / "summary.json").read_text())["resumed_from"]
    _assert_identical(_final(killed), reference)

    stopped = tmp_path / "stopped"
    proc = _launch(stopped)
    _wait_for_checkpoint(proc, stopped)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM: committed" in err
    newest = committed_checkpoints(stopped / "checkpoints")[-1]
    assert 0 < int(newest.name.split("-")[1]) < STEPS
    code, out, err = _finish(_launch(stopped))
    assert code == 0, err
    assert f"resuming from {newest}" in err
    _assert_identical(_final(stopped), reference)
