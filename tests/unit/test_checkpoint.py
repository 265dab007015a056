"""The commit protocol, verification, fallback and rotation, without a process group."""

import enum
import io
import json
import os
import pathlib
import pickle

import pytest
import torch

from distributed_train.batches import to_cpu_copy
from distributed_train.errors import UsageError
from distributed_train.training.checkpoints import commit, shards
from tests.helpers import TASKS

STATE = commit.TRAIN_STATE  # the file every checkpoint has (rank 0's state beside the DCP shards)


def _state(value: float) -> dict:
    return {"w": torch.full((4,), value), "nested": {"step": int(value), "t": [torch.ones(2)]}}


def _write(directory, step: int, state: dict):
    """A checkpoint of `state` alone, through the commit protocol the trainer's writes use."""
    tmp = directory / f"{commit.TMP_PREFIX}{commit.checkpoint_name(step)}"
    return commit.commit_directory(directory, step, lambda: shards.write_train_state(tmp, state))


def test_write_commits_with_marker_last_and_loads_back(tmp_path):
    path = _write(tmp_path, 7, _state(7.0))
    assert path.name == "step-00000007"
    marker = json.loads((path / commit.MARKER).read_text())
    assert marker["step"] == 7
    assert marker["files"][STATE]["size"] == (path / STATE).stat().st_size
    assert commit.verify(path) is None
    loaded = shards.read_train_state(path)
    assert torch.equal(loaded["w"], torch.full((4,), 7.0)) and loaded["nested"]["step"] == 7
    assert not list(tmp_path.glob(".tmp-*")), "temporary directory left behind"


def test_uncommitted_and_temporary_directories_are_ignored(tmp_path):
    _write(tmp_path, 1, _state(1.0))
    # A crash after the rename but before the marker, and a crash before the rename.
    (tmp_path / "step-00000002").mkdir()
    torch.save(_state(2.0), tmp_path / "step-00000002" / STATE)
    (tmp_path / ".tmp-step-00000003").mkdir()
    assert [p.name for p in commit.committed_checkpoints(tmp_path)] == ["step-00000001"]
    assert commit.latest_valid(tmp_path).name == "step-00000001"


def test_crash_between_write_and_commit_keeps_previous(tmp_path, monkeypatch):
    _write(tmp_path, 1, _state(1.0))

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(commit.json, "dump", crash)  # dies while writing the marker
    with pytest.raises(commit.CheckpointWriteFailed):
        _write(tmp_path, 2, _state(2.0))
    monkeypatch.undo()
    latest = commit.latest_valid(tmp_path)
    assert latest.name == "step-00000001"
    assert torch.equal(shards.read_train_state(latest)["w"], torch.full((4,), 1.0))


def test_full_disk_during_save_surfaces_and_keeps_previous(tmp_path, monkeypatch):
    _write(tmp_path, 1, _state(1.0))
    writer = commit.AsyncWriter()

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.torch, "save", full_disk)
    writer.run(2, lambda: _write(tmp_path, 2, _state(2.0)))
    with pytest.raises(commit.CheckpointWriteFailed,
                       match="step-00000002 failed: no space left on device.*previous committed checkpoint is intact"):
        writer.wait()
    assert [p.name for p in commit.committed_checkpoints(tmp_path)] == ["step-00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no .tmp-* left behind
    assert commit.verify(tmp_path / "step-00000001") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "marker"])
def test_damaged_newest_falls_back_with_warning(tmp_path, damage, monkeypatch):
    _write(tmp_path, 1, _state(1.0))
    newest = _write(tmp_path, 2, _state(2.0))
    state = newest / STATE
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
        (newest / commit.MARKER).write_text("{not json")
    warnings: list[str] = []
    # Capture at the module's logger itself: the package logger may not propagate to the root.
    monkeypatch.setattr(commit.log, "warning", lambda msg, *args: warnings.append(msg % args))
    with commit.quietly():  # the launcher's check before the workers start: they say it once
        assert commit.latest_valid(tmp_path).name == "step-00000001"
    assert not warnings
    assert commit.latest_valid(tmp_path).name == "step-00000001"
    assert len(warnings) == 1 and "step-00000002" in warnings[0]


def test_rotation_only_removes_older_committed(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step, _state(float(step)))
    (tmp_path / ".tmp-step-00000002").mkdir()  # stale leftover, older than the newest
    commit.rotate(tmp_path, keep_last=2, kept_step=3)
    assert [p.name for p in commit.committed_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert not (tmp_path / ".tmp-step-00000002").exists()


def test_async_writer_commits_a_copy_not_live_tensors(tmp_path):
    live = {"w": torch.zeros(3)}
    writer = commit.AsyncWriter()
    copy = to_cpu_copy(live)
    writer.run(5, lambda: _write(tmp_path, 5, copy))
    live["w"] += 1  # training goes on while the write is in flight
    writer.wait()
    assert torch.equal(shards.read_train_state(tmp_path / "step-00000005")["w"], torch.zeros(3))


def test_resolve_resume_modes(tmp_path):
    run_dir = tmp_path / "run"
    assert commit.resolve_resume(run_dir, "auto", overwrite=False) is None
    assert commit.resolve_resume(run_dir, "never", overwrite=False) is None
    first = _write(run_dir / "checkpoints", 4, _state(4.0))
    assert commit.resolve_resume(run_dir, "auto", overwrite=False) == first
    with pytest.raises(UsageError, match="already has checkpoints.*checkpoint.overwrite=true"):
        commit.resolve_resume(run_dir, "never", overwrite=False)
    assert commit.resolve_resume(run_dir, "never", overwrite=True) is None
    assert commit.resolve_resume(tmp_path / "x", str(first), overwrite=False) == first
    assert commit.resolve_resume(tmp_path / "x", str(run_dir), overwrite=False) == first
    with pytest.raises(UsageError, match="nope' does not exist: give a checkpoint directory or a run directory$"):
        commit.resolve_resume(run_dir, str(tmp_path / "nope"), overwrite=False)
    (tmp_path / "a-file").write_text("x")  # a file given where a folder is expected: said so
    with pytest.raises(UsageError, match="a-file' is a file, not a directory: give a checkpoint directory"):
        commit.resolve_resume(run_dir, str(tmp_path / "a-file"), overwrite=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty' is not a committed checkpoint"):
        commit.resolve_resume(run_dir, str(tmp_path / "empty"), overwrite=False)


def test_every_checkpoint_damaged_is_refused_never_a_silent_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(commit.log, "warning", lambda *args: None)
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 4):
        (_write(checkpoints, step, _state(float(step))) / STATE).unlink()  # e.g. an NFS hiccup lost them
    with pytest.raises(UsageError, match=r"has 2 committed checkpoint\(s\) and none verifies \(newest, "
                                         r"step-00000004: train_state.pt is missing\).*checkpoint.overwrite=true"):
        commit.resolve_resume(tmp_path, "auto", overwrite=False)
    assert commit.resolve_resume(tmp_path, "never", overwrite=True) is None  # starting over is explicit
    _write(checkpoints, 6, _state(6.0))
    assert commit.resolve_resume(tmp_path, "auto", overwrite=False).name == "step-00000006"


def test_weights_only_refuses_code(tmp_path):
    path = _write(tmp_path, 1, _state(1.0))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"evil": Evil()}, path / STATE)
    # Re-commit the marker for the evil file so only weights_only stands in the way.
    os.remove(path / commit.MARKER)
    marker = {"program": commit.PROGRAM, "step": 1, "format": commit.FORMAT_VERSION,
              "files": {STATE: {"size": (path / STATE).stat().st_size, "sha256": commit.sha256(path / STATE)}}}
    (path / commit.MARKER).write_text(json.dumps(marker))
    with pytest.raises(UsageError, match="cannot be loaded"):
        shards.read_train_state(path)


def test_incompatibilities_name_the_key():
    saved = {"task": "digits", "seed": 0, "task_args": {}, "train": {"batch_size": 64, "lr": 0.1}}
    same_math = {**saved, "train": {"batch_size": 64, "lr": 0.5}}
    assert commit.incompatibilities(saved, same_math) == []
    changed = {**saved, "seed": 1, "train": {"batch_size": 32}}
    assert commit.incompatibilities(saved, changed) == ["seed: 0 -> 1", "train.batch_size: 64 -> 32"]


def _warnings(monkeypatch) -> list[str]:
    found: list[str] = []
    monkeypatch.setattr(commit.log, "warning", lambda msg, *args: found.append(msg % args))
    return found


def test_only_folders_with_this_programs_commit_record_are_checkpoints(tmp_path, monkeypatch):
    import shutil

    warnings = _warnings(monkeypatch)
    _write(tmp_path, 5, _state(5.0))
    newest = _write(tmp_path, 10, _state(10.0))
    shutil.copytree(newest, tmp_path / "step-00000099")  # a user's copy: its record says step 10
    (tmp_path / "step-00000500").mkdir()  # looks like a step, has no record
    (tmp_path / "backup").mkdir()
    other = tmp_path / "step-00000200"  # a record another program wrote
    other.mkdir()
    (other / commit.MARKER).write_text(json.dumps({"program": "other", "step": 200, "format": 1,
                                                       "files": {STATE: {}}}))
    assert commit.latest_valid(tmp_path) == newest
    assert [p.name for p in commit.committed_checkpoints(tmp_path)] == ["step-00000005", "step-00000010"]
    assert len(warnings) == 1  # one line, once per process, naming every foreign entry
    assert all(name in warnings[0] for name in ("backup", "step-00000099", "step-00000200", "step-00000500"))
    _write(tmp_path, 15, _state(15.0))
    commit.rotate(tmp_path, keep_last=1, kept_step=15)  # deletes step 5 and 10, nothing foreign
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backup", "step-00000015", "step-00000099", "step-00000200", "step-00000500"]
    assert len(warnings) == 1


def test_checkpoints_are_ordered_by_the_recorded_step(tmp_path):
    for step in (9, 10, 100):  # names sort the same as numbers here, records decide anyway
        _write(tmp_path, step, _state(float(step)))
    assert [s for s, _ in commit.checkpoint_steps(tmp_path)] == [9, 10, 100]
    big = _write(tmp_path, 123_456_789, _state(1.0))  # wider than the name's 8 digits
    assert commit.latest_valid(tmp_path) == big


def test_rotation_never_deletes_a_checkpoint_newer_than_the_kept_one(tmp_path):
    for step in (2, 4, 6, 8):
        _write(tmp_path, step, _state(float(step)))
    # A run resumed from step 4 (checkpoint.resume=PATH) commits step 5 with keep_last=2.
    _write(tmp_path, 5, _state(5.0))
    commit.rotate(tmp_path, keep_last=2, kept_step=5)
    assert [s for s, _ in commit.checkpoint_steps(tmp_path)] == [4, 5, 6, 8]


def test_a_failed_commit_leaves_nothing_and_names_the_path(tmp_path, monkeypatch):
    _write(tmp_path, 1, _state(1.0))

    def full_disk(final, step, known=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(commit, "_commit", full_disk)  # fails after the rename, before the record
    with pytest.raises(commit.CheckpointWriteFailed, match=r"step-00000002 failed: no space left on device"):
        _write(tmp_path, 2, _state(2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert commit.verify(tmp_path / "step-00000001") is None


def test_full_disk_on_a_real_device_is_one_clean_error(tmp_path, monkeypatch):
    real_open = open

    def open_full(path, mode="r", *args, **kwargs):  # /dev/full: every write fails with ENOSPC
        return real_open("/dev/full", mode, *args, **kwargs) if str(path).endswith(STATE) else \
            real_open(path, mode, *args, **kwargs)

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    monkeypatch.setattr("builtins.open", open_full)
    with pytest.raises(commit.CheckpointWriteFailed, match="no space left on device") as info:
        _write(tmp_path, 3, _state(3.0))
    assert isinstance(info.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []


def test_a_train_state_the_disk_cut_short_is_the_os_error_not_torchs_unexpected_pos(tmp_path):
    """A real partial write (a file-size limit: the first write fills the room, the next fails with
    EFBIG, as with ENOSPC on a disk that fills up): torch.save raises its own RuntimeError ("unexpected
    pos ...") while handling the OSError, and the commit protocol reports the OSError."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import pathlib, resource, signal, sys, torch
        from distributed_train.training.checkpoints import commit, shards
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
        directory = pathlib.Path(sys.argv[1])
        tmp = directory / f"{commit.TMP_PREFIX}{shards.checkpoint_name(4)}"
        try:
            commit.commit_directory(directory, 4, lambda: shards.write_train_state(tmp, {"w": torch.zeros(100_000)}))
        except commit.CheckpointWriteFailed as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == [f"writing checkpoint {tmp_path / 'step-00000004'} failed: file too large; "
                                        "nothing of it was kept and the previous committed checkpoint is intact"], \
        proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_sharded_writer_rotates_only_after_the_new_checkpoint_is_committed(tmp_path):
    from distributed_train.batches import BatchPlan
    from distributed_train.config import load_config
    from distributed_train.distributed import DistEnv
    from distributed_train.engines.ddp import DDPEngine
    from distributed_train.task import load_task
    from distributed_train.training.checkpoints.shards import ShardedWriter

    config = load_config(None, [f"--task={TASKS}/toy.py:Regression", "--train.batch_size=8"])
    engine = DDPEngine(load_task(config.task, config), config, DistEnv(), torch.device("cpu"),
                       BatchPlan.make(8, 1, None), total_steps=10)
    seen = []

    def rotate(step):  # what the rotation finds when it runs: the new checkpoint must be there
        seen.append([p.name for p in commit.committed_checkpoints(tmp_path)])
        commit.rotate(tmp_path, 1, step)

    writer = ShardedWriter(tmp_path, is_main=True, rotate=rotate)
    for step in (1, 2, 3):
        writer.submit(step, engine, {"step": step}, blocking=True)
        assert [p.name for p in commit.committed_checkpoints(tmp_path)] == [f"step-{step:08d}"]
    assert seen == [["step-00000001"], ["step-00000001", "step-00000002"], ["step-00000002", "step-00000003"]]


class _EnumsByGetattr(pickle.Pickler):
    """Pickles enum members as `getattr(cls, name)`, as Debian bookworm's Python 3.11.2 does."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


def test_metadata_with_enum_members_pickled_by_getattr_loads_and_nothing_else_does(tmp_path):
    """A checkpoint written under another Python release (the image's) resumes; getattr on
    anything but a member of an allowed enum stays refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import metadata as dcp_metadata

    from distributed_train.training.checkpoints import safe_load

    with safe_load.single_process_quietly():
        dcp.save({"w": torch.arange(4.0)}, checkpoint_id=str(tmp_path), no_dist=True)
    with open(tmp_path / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test's own, trusted checkpoint
    buffer = io.BytesIO()
    _EnumsByGetattr(buffer, protocol=4).dump(metadata)
    assert b"getattr" in buffer.getvalue() and b"_MEM_FORMAT_ENCODING" in buffer.getvalue()
    (tmp_path / ".metadata").write_bytes(buffer.getvalue())
    loaded = safe_load.SafeReader(str(tmp_path)).read_metadata()
    assert loaded.state_dict_metadata == metadata.state_dict_metadata
    state = {"w": torch.zeros(4)}
    safe_load.load(state, tmp_path)
    assert torch.equal(state["w"], torch.arange(4.0))

    for planted in ((getattr, (pathlib.PosixPath, "__init__")),  # an allowed class, not an enum
                    (getattr, (dcp_metadata._MEM_FORMAT_ENCODING, "__class__"))):  # not a member
        class Planted:
            def __reduce__(self, planted=planted):
                return planted
        (tmp_path / ".metadata").write_bytes(pickle.dumps(Planted(), protocol=4))
        with pytest.raises(UsageError, match=r"\.metadata is not DCP metadata \(getattr\("):
            safe_load.SafeReader(str(tmp_path)).read_metadata()
