"""The commit protocol, verification, fallback and rotation, without a process group."""

import json
import os

import pytest
import torch

from distributed_train.training import checkpoint
from distributed_train.errors import UsageError
from distributed_train.training.data import to_cpu_copy
from tests.helpers import TASKS


def _state(value: float) -> dict:
    return {"w": torch.full((4,), value), "nested": {"step": int(value), "t": [torch.ones(2)]}}


def test_write_commits_with_marker_last_and_loads_back(tmp_path):
    path = checkpoint.write_checkpoint(tmp_path, 7, _state(7.0))
    assert path.name == "step-00000007"
    marker = json.loads((path / checkpoint.MARKER).read_text())
    assert marker["step"] == 7
    assert marker["files"]["state.pt"]["size"] == (path / "state.pt").stat().st_size
    assert checkpoint.verify(path) is None
    loaded = checkpoint.load_state(path)
    assert torch.equal(loaded["w"], torch.full((4,), 7.0)) and loaded["nested"]["step"] == 7
    assert not list(tmp_path.glob(".tmp-*")), "temporary directory left behind"


def test_uncommitted_and_temporary_directories_are_ignored(tmp_path):
    checkpoint.write_checkpoint(tmp_path, 1, _state(1.0))
    # A crash after the rename but before the marker, and a crash before the rename.
    (tmp_path / "step-00000002").mkdir()
    torch.save(_state(2.0), tmp_path / "step-00000002" / "state.pt")
    (tmp_path / ".tmp-step-00000003").mkdir()
    assert [p.name for p in checkpoint.committed_checkpoints(tmp_path)] == ["step-00000001"]
    assert checkpoint.latest_valid(tmp_path).name == "step-00000001"


def test_crash_between_write_and_commit_keeps_previous(tmp_path, monkeypatch):
    checkpoint.write_checkpoint(tmp_path, 1, _state(1.0))

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.json, "dump", crash)  # dies while writing the marker
    with pytest.raises(checkpoint.CheckpointWriteFailed):
        checkpoint.write_checkpoint(tmp_path, 2, _state(2.0))
    monkeypatch.undo()
    latest = checkpoint.latest_valid(tmp_path)
    assert latest.name == "step-00000001"
    assert torch.equal(checkpoint.load_state(latest)["w"], torch.full((4,), 1.0))


def test_full_disk_during_save_surfaces_and_keeps_previous(tmp_path, monkeypatch):
    checkpoint.write_checkpoint(tmp_path, 1, _state(1.0))
    writer = checkpoint.AsyncWriter()

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    writer.submit(tmp_path, 2, _state(2.0), keep_last=1)
    with pytest.raises(checkpoint.CheckpointWriteFailed,
                       match="step-00000002 failed: no space left on device.*previous committed checkpoint is intact"):
        writer.wait()
    assert [p.name for p in checkpoint.committed_checkpoints(tmp_path)] == ["step-00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no .tmp-* left behind
    assert checkpoint.verify(tmp_path / "step-00000001") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "marker"])
def test_damaged_newest_falls_back_with_warning(tmp_path, damage, monkeypatch):
    checkpoint.write_checkpoint(tmp_path, 1, _state(1.0))
    newest = checkpoint.write_checkpoint(tmp_path, 2, _state(2.0))
    state = newest / "state.pt"
    if damage == "truncate":
        with open(state, "r+b") as f:
            f.truncate(state.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == "delete":
        state.unlink()
    else:
        (newest / checkpoint.MARKER).write_text("{not json")
    warnings: list[str] = []
    # Capture at the module's logger itself: the package logger may not propagate to the root.
    monkeypatch.setattr(checkpoint.log, "warning", lambda msg, *args: warnings.append(msg % args))
    assert checkpoint.latest_valid(tmp_path).name == "step-00000001"
    assert len(warnings) == 1 and "step-00000002" in warnings[0]


def test_rotation_only_removes_older_committed(tmp_path):
    for step in (1, 2, 3):
        checkpoint.write_checkpoint(tmp_path, step, _state(float(step)))
    (tmp_path / ".tmp-step-00000002").mkdir()  # stale leftover, older than the newest
    checkpoint.rotate(tmp_path, keep_last=2, kept_step=3)
    assert [p.name for p in checkpoint.committed_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert not (tmp_path / ".tmp-step-00000002").exists()


def test_async_writer_commits_a_copy_not_live_tensors(tmp_path):
    live = {"w": torch.zeros(3)}
    writer = checkpoint.AsyncWriter()
    writer.submit(tmp_path, 5, to_cpu_copy(live), keep_last=2)
    live["w"] += 1  # training goes on while the write is in flight
    writer.wait()
    assert torch.equal(checkpoint.load_state(tmp_path / "step-00000005")["w"], torch.zeros(3))


def test_resolve_resume_modes(tmp_path):
    run_dir = tmp_path / "run"
    assert checkpoint.resolve_resume(run_dir, "auto", overwrite=False) is None
    assert checkpoint.resolve_resume(run_dir, "never", overwrite=False) is None
    first = checkpoint.write_checkpoint(run_dir / "checkpoints", 4, _state(4.0))
    assert checkpoint.resolve_resume(run_dir, "auto", overwrite=False) == first
    with pytest.raises(UsageError, match="already has checkpoints.*checkpoint.overwrite=true"):
        checkpoint.resolve_resume(run_dir, "never", overwrite=False)
    assert checkpoint.resolve_resume(run_dir, "never", overwrite=True) is None
    assert checkpoint.resolve_resume(tmp_path / "x", str(first), overwrite=False) == first
    assert checkpoint.resolve_resume(tmp_path / "x", str(run_dir), overwrite=False) == first
    with pytest.raises(UsageError, match="not a committed checkpoint"):
        checkpoint.resolve_resume(run_dir, str(tmp_path / "nope"), overwrite=False)


def test_weights_only_refuses_code(tmp_path):
    path = checkpoint.write_checkpoint(tmp_path, 1, _state(1.0))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"evil": Evil()}, path / "state.pt")
    # Re-commit the marker for the evil file so only weights_only stands in the way.
    os.remove(path / checkpoint.MARKER)
    marker = {"step": 1, "files": {"state.pt": {"size": (path / "state.pt").stat().st_size,
                                                "sha256": checkpoint._sha256(path / "state.pt")}}}
    (path / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.raises(UsageError, match="cannot be loaded"):
        checkpoint.load_state(path)


def test_incompatibilities_name_the_key():
    saved = {"task": "digits", "seed": 0, "task_args": {}, "train": {"batch_size": 64, "lr": 0.1}}
    same_math = {**saved, "train": {"batch_size": 64, "lr": 0.5}}
    assert checkpoint.incompatibilities(saved, same_math) == []
    changed = {**saved, "seed": 1, "train": {"batch_size": 32}}
    assert checkpoint.incompatibilities(saved, changed) == ["seed: 0 -> 1", "train.batch_size: 64 -> 32"]


def _warnings(monkeypatch) -> list[str]:
    found: list[str] = []
    monkeypatch.setattr(checkpoint.log, "warning", lambda msg, *args: found.append(msg % args))
    return found


def test_only_folders_with_this_programs_commit_record_are_checkpoints(tmp_path, monkeypatch):
    import shutil

    warnings = _warnings(monkeypatch)
    checkpoint.write_checkpoint(tmp_path, 5, _state(5.0))
    newest = checkpoint.write_checkpoint(tmp_path, 10, _state(10.0))
    shutil.copytree(newest, tmp_path / "step-00000099")  # a user's copy: its record says step 10
    (tmp_path / "step-00000500").mkdir()  # looks like a step, has no record
    (tmp_path / "backup").mkdir()
    other = tmp_path / "step-00000200"  # a record another program wrote
    other.mkdir()
    (other / checkpoint.MARKER).write_text(json.dumps({"program": "other", "step": 200, "format": 1,
                                                       "files": {"state.pt": {}}}))
    assert checkpoint.latest_valid(tmp_path) == newest
    assert [p.name for p in checkpoint.committed_checkpoints(tmp_path)] == ["step-00000005", "step-00000010"]
    assert len(warnings) == 1  # one line, once per process, naming every foreign entry
    assert all(name in warnings[0] for name in ("backup", "step-00000099", "step-00000200", "step-00000500"))
    checkpoint.write_checkpoint(tmp_path, 15, _state(15.0))
    checkpoint.rotate(tmp_path, keep_last=1, kept_step=15)  # deletes step 5 and 10, nothing foreign
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backup", "step-00000015", "step-00000099", "step-00000200", "step-00000500"]
    assert len(warnings) == 1


def test_checkpoints_are_ordered_by_the_recorded_step(tmp_path):
    for step in (9, 10, 100):  # names sort the same as numbers here, records decide anyway
        checkpoint.write_checkpoint(tmp_path, step, _state(float(step)))
    assert [s for s, _ in checkpoint.checkpoint_steps(tmp_path)] == [9, 10, 100]
    big = checkpoint.write_checkpoint(tmp_path, 123_456_789, _state(1.0))  # wider than the name's 8 digits
    assert checkpoint.latest_valid(tmp_path) == big


def test_rotation_never_deletes_a_checkpoint_newer_than_the_kept_one(tmp_path):
    for step in (2, 4, 6, 8):
        checkpoint.write_checkpoint(tmp_path, step, _state(float(step)))
    # A run resumed from step 4 (checkpoint.resume=PATH) commits step 5 with keep_last=2.
    checkpoint.write_checkpoint(tmp_path, 5, _state(5.0))
    checkpoint.rotate(tmp_path, keep_last=2, kept_step=5)
    assert [s for s, _ in checkpoint.checkpoint_steps(tmp_path)] == [4, 5, 6, 8]


def test_a_failed_commit_leaves_nothing_and_names_the_path(tmp_path, monkeypatch):
    checkpoint.write_checkpoint(tmp_path, 1, _state(1.0))

    def full_disk(final, step):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_commit", full_disk)  # fails after the rename, before the record
    with pytest.raises(checkpoint.CheckpointWriteFailed, match=r"step-00000002 failed: no space left on device"):
        checkpoint.write_checkpoint(tmp_path, 2, _state(2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert checkpoint.verify(tmp_path / "step-00000001") is None


def test_full_disk_on_a_real_device_is_one_clean_error(tmp_path, monkeypatch):
    real_open = open

    def open_full(path, mode="r", *args, **kwargs):  # /dev/full: every write fails with ENOSPC
        return real_open("/dev/full", mode, *args, **kwargs) if str(path).endswith("state.pt") else \
            real_open(path, mode, *args, **kwargs)

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    monkeypatch.setattr("builtins.open", open_full)
    with pytest.raises(checkpoint.CheckpointWriteFailed, match="no space left on device") as info:
        checkpoint.write_checkpoint(tmp_path, 3, _state(3.0))
    assert isinstance(info.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []


def test_sharded_writer_rotates_only_after_the_new_checkpoint_is_committed(tmp_path):
    from distributed_train.config import load_config
    from distributed_train.dist import DistEnv
    from distributed_train.engines.ddp import DDPEngine
    from distributed_train.task import load_task
    from distributed_train.training.data import BatchPlan
    from distributed_train.training.sharded_checkpoint import ShardedWriter

    config = load_config(None, [f"--task={TASKS}/toy.py:Regression", "--train.batch_size=8"])
    engine = DDPEngine(load_task(config.task, config), config, DistEnv(), torch.device("cpu"),
                       BatchPlan.make(8, 1, None), total_steps=10)
    seen = []

    def rotate(step):  # what the rotation finds when it runs: the new checkpoint must be there
        seen.append([p.name for p in checkpoint.committed_checkpoints(tmp_path)])
        checkpoint.rotate(tmp_path, 1, step)

    writer = ShardedWriter(tmp_path, is_main=True, rotate=rotate)
    for step in (1, 2, 3):
        writer.submit(step, engine, {"step": step}, blocking=True)
        assert [p.name for p in checkpoint.committed_checkpoints(tmp_path)] == [f"step-{step:08d}"]
    assert seen == [["step-00000001"], ["step-00000001", "step-00000002"], ["step-00000002", "step-00000003"]]
