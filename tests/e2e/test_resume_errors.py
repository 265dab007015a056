"""Resume mistakes exit 2 with one line naming what differs, and leave the checkpoints alone."""

import pytest

from distributed_train.training.checkpoints.commit import committed_checkpoints
from tests.helpers import dtrain

pytestmark = pytest.mark.slow


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_incompatible_resume_and_never_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    base = ["train", f"--run_dir={run_dir}", "--train.max_steps=6", "--checkpoint.every_steps=3",
            "--log.wandb=disabled"]
    first = dtrain(*base)
    # One process saves without a process group: torch's "assuming ... a single process" is not shown.
    assert "torch.distributed is disabled" not in first.stderr, first.stderr
    before = [(p.name, (p / "train_state.pt").stat().st_mtime_ns)
              for p in committed_checkpoints(run_dir / "checkpoints")]

    line = _one_error_line(dtrain(*base, "--seed=1", "--train.batch_size=32", check=False))
    assert "seed: 0 -> 1" in line and "train.batch_size: 64 -> 32" in line and "allow_changes" in line
    line = _one_error_line(dtrain(*base, "--task=charlm", check=False))
    assert "task: 'digits' -> 'charlm'" in line
    line = _one_error_line(dtrain(*base, "--checkpoint.resume=never", check=False))
    assert "already has checkpoints" in line and "checkpoint.overwrite=true" in line
    line = _one_error_line(dtrain(*base, f"--checkpoint.resume={tmp_path / 'missing'}", check=False))
    assert "checkpoint.resume=" in line
    line = _one_error_line(dtrain(*base, "--train.max_steps=4", check=False))  # below the checkpoint's 6
    assert "is at step 6, past this run's 4 steps: raise train.max_steps" in line

    # dtrain launch finds the same mistakes before it starts any worker: its one line, and no
    # worker's `start` event in the run's log.
    starts = (run_dir / "metrics.jsonl").read_text().count('"kind": "start"')
    assert starts >= 1
    launch = ["launch", "--nproc-per-node", "2", *base[1:]]
    for extra, needle in ((["--seed=1"], "seed: 0 -> 1"), (["--checkpoint.resume=never"], "already has checkpoints"),
                          (["--train.max_steps=4"], "is at step 6, past this run's 4 steps")):
        line = _one_error_line(dtrain(*launch, *extra, check=False))
        assert line.startswith("dtrain: error: ") and needle in line, line
    assert (run_dir / "metrics.jsonl").read_text().count('"kind": "start"') == starts

    after = [(p.name, (p / "train_state.pt").stat().st_mtime_ns)
             for p in committed_checkpoints(run_dir / "checkpoints")]
    assert after == before, "a refused resume touched the checkpoints"

    # An explicit allowance continues the same run with the changed setting.
    ok = dtrain(*base, "--train.max_steps=9", "--train.batch_size=32", "--checkpoint.allow_changes=true")
    assert "resuming from" in ok.stderr


def test_unwritable_run_dir_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a-file"  # a directory cannot be created below a file, even by root
    blocker.write_text("")
    line = _one_error_line(dtrain("train", f"--run_dir={blocker / 'run'}", "--train.max_steps=2", check=False))
    assert line == (f"dtrain: error: run_dir {str(blocker / 'run')!r} cannot be created ({str(blocker)!r} is a file, "
                    "not a directory)")
