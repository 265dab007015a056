"""`dtrain export CHECKPOINT_OR_RUN_DIR -o FILE`: the consolidated model of a committed checkpoint
(a run directory: its latest one, or its final_model.pt when it has none), local or at a URL.

Works on one process with no GPU, whatever engine and world size wrote the checkpoint: the
shards are read by parameter name and assembled into full CPU tensors. FILE.pt is a plain
state_dict (like final_model.pt, loadable with weights_only=True); FILE.safetensors needs the
`safetensors` package.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import tempfile
from pathlib import Path

import torch

from distributed_train.cli import described
from distributed_train.errors import EXIT_OK, UsageError
from distributed_train.files import atomic_write, require
from distributed_train.storage import StorageError, Store, is_url
from distributed_train.training.checkpoints import commit, remote, safe_load, shards


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dtrain export", description=described(__doc__))
    parser.add_argument("source", help="a committed checkpoint directory, or a run directory (its latest "
                        "checkpoint, else its final_model.pt)")
    parser.add_argument("-o", "--output", required=True, help="FILE.pt or FILE.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def find_model(source: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The model `source` names, and where it came from: a committed checkpoint; a run directory's
    latest valid one, or its final_model.pt when it has no checkpoint (a run without them)."""
    require(source, "directory", "the checkpoint or run directory")
    if commit.commit_record(source, check_name=False) is not None or commit.committed_checkpoints(
            source / "checkpoints"):
        path = commit.resolve_resume(source, str(source), overwrite=False)
        return model_state(path), path
    final = source / "final_model.pt"
    if final.is_file():
        try:
            return torch.load(final, map_location="cpu", weights_only=True), final
        except Exception as exc:  # noqa: BLE001 - damaged, or not plain data: one line, nothing run
            raise UsageError(f"{final} cannot be loaded ({safe_load.why_not_loaded(exc)})") from None
    raise UsageError(f"{str(source)!r} is neither a committed checkpoint nor a run directory with "
                     "checkpoints or a final_model.pt")


def find_model_in_bucket(url: str, folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """find_model for a URL: a run directory in a bucket (its newest committed checkpoint, else
    its final_model.pt) or one committed checkpoint folder in it; copied to `folder` first (every
    checksum checked)."""
    base, _, name = url.rpartition("/")
    try:
        if base.endswith(f"/{remote.PREFIX}"):  # .../checkpoints/step-00000120-<id>: one checkpoint
            store = Store(base.rsplit("/", 1)[0])
            chosen = next((r for r in remote.committed(store)[0] if r.folder == name), None)
            if chosen is None:
                raise UsageError(f"{url!r} is not a committed checkpoint (no {commit.MARKER} written by this "
                                 "program, or an object it lists is missing)")
        else:
            store = Store(url)
            found = remote.committed(store)[0]
            chosen = found[-1] if found else None
        if chosen is not None:
            return model_state(remote.download(store, chosen, folder)), chosen.url(store)
        if store.get_if_exists("final_model.pt", str(folder / "final_model.pt")):
            return find_model(folder)[0], f"{url}/final_model.pt"
    except StorageError as exc:
        raise UsageError(str(exc)) from None
    raise UsageError(f"{url!r} is neither a committed checkpoint nor a run directory with checkpoints or a "
                     "final_model.pt")


def model_state(path: Path) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the checkpoint's model, keyed like the task's own model."""
    state = shards.read_model(path)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def write(state: dict[str, torch.Tensor], output: Path) -> None:
    """Write atomically: a reader never sees half a file; a failure is one line and leaves none."""
    if output.suffix == ".safetensors":
        try:
            import safetensors.torch  # noqa: F401 - _save_safetensors writes with it
        except ImportError:
            raise UsageError("writing .safetensors needs the safetensors package (pip install safetensors); "
                             "or write a .pt file") from None
        # Tied weights share storage in the model; safetensors stores each name separately.
        atomic_write(output, lambda f: _save_safetensors({k: v.clone() for k, v in state.items()}, f), "the export")
    elif output.suffix == ".pt":
        atomic_write(output, lambda f: torch.save(state, f), "the export")
    else:
        raise UsageError(f"-o {str(output)!r}: the file must end in .pt or .safetensors")


def _save_safetensors(tensors: dict[str, torch.Tensor], f) -> None:
    """safetensors writes by path (no copy of the whole file in memory), to a new file of its own
    that it renames over f's path: that file gets f's permissions (not safetensors' 0600) and is
    synced itself (syncing f would sync the replaced file); its I/O errors are OSErrors."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, f.name)
    except SafetensorError as exc:  # "Error while serializing: I/O error: No space left on device (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise RuntimeError(str(exc)) from exc
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from exc
    written = os.open(f.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(written, stat.S_IMODE(os.fstat(f.fileno()).st_mode))
        os.fsync(written)
    finally:
        os.close(written)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    if output.suffix not in (".pt", ".safetensors"):
        raise UsageError(f"-o {args.output!r}: the file must end in .pt or .safetensors")
    if output.is_dir():
        raise UsageError(f"-o {args.output!r} is a directory; name the file to write, e.g. {output / 'model.pt'}")
    if output.exists() and not args.overwrite:
        raise UsageError(f"-o {args.output!r} already exists; pass --overwrite to replace it")
    if is_url(args.source):
        with tempfile.TemporaryDirectory() as folder:
            state, path = find_model_in_bucket(args.source.rstrip("/"), Path(folder))
    else:
        state, path = find_model(Path(args.source))
    write(state, output)
    total = sum(t.numel() for t in state.values())
    print(f"wrote {output}: {len(state)} tensors, {total:,} values, from {path}")
    return EXIT_OK
