"""engine=fsdp end to end: SIGKILL of a worker under --max-restarts, and SIGTERM (the ranks agree on
the step, save their shards together, and a rerun continues), both bit-identical to an
uninterrupted run; `dtrain export` of the last checkpoint equals final_model.pt."""

import pytest
import torch

from tests.e2e.test_fault_tolerance import (
    _assert_identical,
    _final,
    _finish,
    _kill_a_worker_and_finish,
    _sigterm_after_a_checkpoint,
)
from tests.e2e.test_fault_tolerance import _launch as launch
from tests.helpers import dtrain

pytestmark = pytest.mark.slow

STEPS = 300
ARGS = ["--nproc-per-node", "2", "--engine=fsdp", f"--train.max_steps={STEPS}", "--checkpoint.every_steps=50",
        "--log.every_steps=100", "--log.wandb=disabled"]


def _launch(run_dir, *extra):
    return launch(run_dir, *extra, args=ARGS)


def test_fsdp_survives_sigkill_and_sigterm_bit_identical(tmp_path):
    reference_dir = tmp_path / "reference"
    dtrain("launch", *ARGS, f"--run_dir={reference_dir}", timeout=180)
    reference = _final(reference_dir)

    # `dtrain export` of the last committed checkpoint is the final model.
    dtrain("export", str(reference_dir), "-o", str(tmp_path / "exported.pt"))
    _assert_identical(torch.load(tmp_path / "exported.pt", weights_only=True), reference)

    killed = tmp_path / "killed"
    _kill_a_worker_and_finish(_launch(killed, "--max-restarts", "2"), killed)
    _assert_identical(_final(killed), reference)

    stopped = tmp_path / "stopped"
    newest = _sigterm_after_a_checkpoint(_launch(stopped), stopped, STEPS)
    code, out, err = _finish(_launch(stopped))
    assert code == 0, err
    assert f"resuming from {newest}" in err
    _assert_identical(_final(stopped), reference)
