"""Crash-safe checkpoints: a checkpoint is committed or it does not exist.

Layout: run_dir/checkpoints/step-00000120/{state.pt, COMMITTED}. A save writes state.pt into
`.tmp-step-...`, fsyncs it and the directory, renames it into place and only then writes the
COMMITTED marker (sizes and sha256 of every file), fsynced through a rename of its own.
Rotation deletes old checkpoints only after the new one is committed. Loading considers
committed checkpoints only, verifies them, and falls back to the previous one if the newest is
damaged. Files are read with `torch.load(weights_only=True)`: a checkpoint cannot run code.

This module knows nothing about process groups: the trainer decides which rank writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from distributed_train.errors import UsageError

log = logging.getLogger("distributed_train")

MARKER = "COMMITTED"
STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU, so training can go on while it is written.

    The one copy path for checkpoints and final_model.pt, whatever the device. GPU tensors go
    into pinned memory without blocking, all queued at once, then one synchronize: one wait for
    the whole state instead of a blocking copy per tensor into pageable memory (seconds for a
    large model, while the other ranks wait in the next collective). Pinned buffers return to
    torch's cache after the write and serve the next checkpoint."""
    devices: set[torch.device] = set()
    copy = _cpu_copy(obj, devices)
    for device in devices:
        torch.cuda.synchronize(device)
    return copy


def _cpu_copy(obj: Any, cuda_devices: set) -> Any:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        if tensor.device.type == "cuda" and type(tensor) is torch.Tensor:
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            cuda_devices.add(tensor.device)
            return host
        return tensor.to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v, cuda_devices) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v, cuda_devices) for v in obj)
    return obj


def write_checkpoint(directory: Path, step: int, state: dict) -> Path:
    """Write and commit `state` as checkpoint `step` under `directory`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    tmp = directory / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp)
    if final.exists():  # an uncommitted leftover, or a re-save of the same step after a restart
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_path(directory)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(final.iterdir())}
    marker = {"step": step, "format": FORMAT_VERSION, "time": time.time(), "files": files}
    marker_tmp = final / f".{MARKER}.tmp"
    with open(marker_tmp, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    marker_tmp.rename(final / MARKER)
    _fsync_path(final)
    return final


def committed_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints that carry a commit marker, oldest first (not yet verified)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else why not (missing marker, size or checksum)."""
    try:
        marker = json.loads((path / MARKER).read_text())
        for name, meta in marker["files"].items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != meta["size"]:
                return f"{name} has {file.stat().st_size} bytes, the marker says {meta['size']}"
            if _sha256(file) != meta["sha256"]:
                return f"{name} fails its checksum"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable commit marker ({exc})"
    return None


def latest_valid(directory: Path) -> Path | None:
    """The newest committed checkpoint that verifies; damaged ones are skipped with a warning."""
    for path in reversed(committed_checkpoints(directory)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s", path, problem)
    return None


def load_state(path: Path) -> dict:
    """The state dict of a verified checkpoint (safe: weights_only)."""
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file is a usage problem, not a crash
        raise UsageError(f"checkpoint {path} cannot be loaded: {type(exc).__name__}: {exc}") from exc


def rotate(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints, and stale uncommitted leftovers."""
    committed = committed_checkpoints(directory)
    for old in committed[: max(0, len(committed) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    newest = committed[-1].name if committed else None
    for leftover in directory.glob("*step-*"):
        if leftover not in committed and newest and leftover.name.removeprefix(".tmp-") < newest:
            shutil.rmtree(leftover, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str, overwrite: bool) -> Path | None:
    """The checkpoint to start from for `checkpoint.resume` (auto / never / a path), or None."""
    directory = run_dir / "checkpoints"
    if resume == "never":
        if committed_checkpoints(directory) and not overwrite:
            raise UsageError(
                f"run_dir {str(run_dir)!r} already has checkpoints; use checkpoint.resume=auto to continue "
                "it, or checkpoint.overwrite=true to start over and replace them"
            )
        return None
    if resume == "auto":
        return latest_valid(directory)
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory: its latest checkpoint
        found = latest_valid(path / "checkpoints")
        if found is None:
            raise UsageError(f"checkpoint.resume={resume!r}: that run has no valid committed checkpoint")
        return found
    if not (path / MARKER).is_file():
        raise UsageError(f"checkpoint.resume={resume!r} is not a committed checkpoint directory (no {MARKER})")
    problem = verify(path)
    if problem:
        raise UsageError(f"checkpoint.resume={resume!r} is damaged: {problem}")
    return path


# Keys whose change alters the math of a resumed run (allowed only with checkpoint.allow_changes).
MATH_KEYS = (("task",), ("task_args",), ("seed",), ("train", "batch_size"))


def incompatibilities(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every math-changing setting that differs."""
    out = []
    for key in MATH_KEYS:
        old, new = saved, current
        for part in key:
            old, new = (old or {}).get(part), (new or {}).get(part)
        if old != new:
            out.append(f"{'.'.join(key)}: {old!r} -> {new!r}")
    return out


class AsyncWriter:
    """Writes committed checkpoints in a background thread, one at a time; errors surface on wait()."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_write_s = 0.0

    def submit(self, directory: Path, step: int, state: dict, keep_last: int) -> None:
        self.wait()

        def work() -> None:
            start = time.perf_counter()
            try:
                write_checkpoint(directory, step, state)
                rotate(directory, keep_last)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                self._error = exc
            self.last_write_s = time.perf_counter() - start

        self._thread = threading.Thread(target=work, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending write is committed; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed ({error}); the previous committed "
                               "checkpoint is intact") from error
