"""Output files are written whole or not at all: a full disk, a missing folder or a directory in
the way is one line naming the path, and no partial file is left under any name."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from distributed_train.errors import UsageError
from distributed_train.files import atomic_write, atomic_write_text


@pytest.fixture
def full_disk(monkeypatch):
    """Every file opened for writing under the folder given to it is /dev/full (ENOSPC on write)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real_open = os.open

    def under(folder):
        def open_full(path, flags, *args, **kwargs):
            if flags & os.O_WRONLY and str(path).startswith(str(folder)):
                real_open(path, flags, *args, **kwargs)  # the file exists, as it would on a full disk
                return real_open("/dev/full", os.O_WRONLY)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_full)
    return under


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, full_disk):
    target = tmp_path / "final_model.pt"
    target.write_bytes(b"previous")
    full_disk(tmp_path)
    with pytest.raises(UsageError) as info:
        atomic_write(target, lambda f: torch.save({"w": torch.ones(1000)}, f), "the final model")
    assert str(info.value) == f"cannot write the final model {target}: no space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model.pt"] and target.read_bytes() == b"previous"


def test_a_failed_write_is_named_by_the_os_error_behind_it_wherever_the_library_put_it():
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from distributed_train.files import failure_text

    def raised_while_handling(cause):  # as torch.save does: its own error, the OSError as __context__
        try:
            try:
                raise cause
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        except RuntimeError as exc:
            return exc

    assert failure_text(raised_while_handling(OSError(28, "No space left on device"))) == "no space left on device"
    # DCP: every rank's failure (as its peers receive it: pickled, without __context__) in one exception
    full = CheckpointException("ranks:dict_keys([1])", {1: (OSError(27, "File too large"), traceback.StackSummary())})
    assert failure_text(full) == "file too large"
    other = CheckpointException("ranks:dict_keys([0])", {0: (ValueError("Shapes differ\nat w"), None)})
    assert failure_text(other) == "shapes differ"  # the rank's error's first line, not "ranks:dict_keys"
    assert failure_text(ValueError("bad\nthing")) == "bad"


def test_a_missing_folder_or_a_directory_in_the_way_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"cannot write .*/missing/summary.json: no such file or directory"):
        atomic_write_text(tmp_path / "missing" / "summary.json", "{}")
    (tmp_path / "model.pt").mkdir()
    with pytest.raises(UsageError, match=r"cannot write the export .*/model.pt: is a directory"):
        atomic_write(tmp_path / "model.pt", lambda f: f.write(b"x"), "the export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


def test_a_link_planted_where_a_file_is_written_is_replaced_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.yaml", ".config.yaml.tmp"):  # the file, and its temporary sibling
        (run_dir / name).symlink_to(victim)
    atomic_write_text(run_dir / "config.yaml", "seed: 0\n")
    assert victim.read_text() == "keep me"
    assert not (run_dir / "config.yaml").is_symlink() and (run_dir / "config.yaml").read_text() == "seed: 0\n"


def test_final_model_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, full_disk):
    from distributed_train.distributed import DistEnv
    from distributed_train.training.outputs import RunOutputs

    class Engine:
        def model_state_dict(self):
            return {"w": torch.ones(1000, 1000)}

    full_disk(tmp_path)
    with pytest.raises(UsageError, match="cannot write the final model .*final_model.pt: no space left on device"):
        RunOutputs(DistEnv(), tmp_path).write_model(Engine())
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_missing_folder_is_one_line_and_a_success_is_whole(tmp_path):
    from distributed_train.cli import export

    state = {"w": torch.arange(6.0).view(2, 3)}
    with pytest.raises(UsageError, match="cannot write the export .*/nope/model.pt: no such file or directory"):
        export.write(state, tmp_path / "nope" / "model.pt")
    export.write(state, tmp_path / "model.pt")
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], state["w"])
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    export.write(state, tmp_path / "model.safetensors")
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], state["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.safetensors"]


def test_a_safetensors_export_is_synced_and_has_the_permissions_of_any_other_output(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    from distributed_train.cli import export

    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd))[1])
    state = {"w": torch.arange(6.0).view(2, 3)}
    export.write(state, tmp_path / "model.pt")
    export.write(state, tmp_path / "model.safetensors")
    out = tmp_path / "model.safetensors"
    assert torch.equal(load_file(str(out))["w"], state["w"])
    # safetensors writes a file of its own, mode 0600, over the one atomic_write opened and synced
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((tmp_path / "model.pt").stat().st_mode)
    assert out.stat().st_ino in synced


def test_an_export_the_disk_cannot_hold_is_one_line_and_leaves_nothing(tmp_path):
    """A real write failure (past a file-size limit: EFBIG, as ENOSPC on a full disk) in both formats."""
    pytest.importorskip("safetensors")
    script = textwrap.dedent("""
        import pathlib, resource, signal, sys, torch
        from distributed_train.cli import export
        from distributed_train.errors import UsageError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        for name in ("model.pt", "model.safetensors"):
            try:
                export.write({"w": torch.zeros(100_000)}, pathlib.Path(sys.argv[1]) / name)
            except UsageError as exc:
                print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == [f"cannot write the export {tmp_path / name}: file too large"
                                        for name in ("model.pt", "model.safetensors")], proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_run_without_checkpoints_takes_its_final_model(tmp_path, capsys):
    from distributed_train.cli import export

    run = tmp_path / "run"
    run.mkdir()
    state = {"0.weight": torch.randn(3, 2)}
    torch.save(state, run / "final_model.pt")
    assert export.main([str(run), "-o", str(tmp_path / "out.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True)["0.weight"], state["0.weight"])
    assert f"from {run / 'final_model.pt'}" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"is neither a committed checkpoint nor a run directory with checkpoints "
                                         r"or a final_model.pt$"):
        export.main([str(tmp_path / "empty"), "-o", str(tmp_path / "x.pt")])


def test_export_never_replaces_a_file_unasked_and_names_a_directory_given_as_the_file(tmp_path):
    from distributed_train.cli import export

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"w": torch.ones(2)}, run / "final_model.pt")
    out = tmp_path / "model.pt"
    out.write_bytes(b"someone else's model")
    with pytest.raises(UsageError, match=r"model.pt' already exists; pass --overwrite to replace it$"):
        export.main([str(run), "-o", str(out)])
    assert out.read_bytes() == b"someone else's model"
    assert export.main([str(run), "-o", str(out), "--overwrite"]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.ones(2))
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(UsageError, match=r"folder.pt' is a directory; name the file to write"):
        export.main([str(run), "-o", str(tmp_path / "folder.pt"), "--overwrite"])


def test_a_folder_given_for_a_file_and_the_reverse_are_named_not_called_missing(tmp_path):
    from distributed_train.files import make_directory, path_problem

    (tmp_path / "f").write_text("x")
    assert path_problem(tmp_path / "f", "file") is None and path_problem(tmp_path, "directory") is None
    assert path_problem(tmp_path, "file") == "is a directory, not a file"
    assert path_problem(tmp_path / "f", "directory") == "is a file, not a directory"
    assert path_problem(tmp_path / "nope", "file") == "does not exist"
    assert path_problem(tmp_path / "f" / "sub", "directory") == f"does not exist ({str(tmp_path / 'f')!r} is a " \
                                                                 "file, not a directory)"
    with pytest.raises(UsageError, match=r"^run_dir '.*/f' is a file, not a directory$"):
        make_directory(tmp_path / "f", "run_dir")
    with pytest.raises(UsageError, match=r"^run_dir '.*/f/a/b' cannot be created \('.*/f' is a file, not a "
                                         r"directory\)$"):
        make_directory(tmp_path / "f" / "a" / "b", "run_dir")
    make_directory(tmp_path / "new" / "deep", "run_dir")
    assert (tmp_path / "new" / "deep").is_dir()
