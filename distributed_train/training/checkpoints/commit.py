"""Crash-safe checkpoints: a checkpoint is committed or it does not exist.

Layout: run_dir/checkpoints/step-00000120/{DCP shards, train_state.pt, COMMITTED} (shards.py
writes the files). A save writes them into `.tmp-step-...`, fsyncs them and the directory, renames
it into place and only then writes the COMMITTED marker (the commit record: this program's name,
the step, sizes and sha256 of every file), fsynced through a rename of its own. A failed write
removes its temporary folder.
Only folders whose commit record this program wrote, for the step their name says, are
checkpoints: found, ordered (by the recorded step) and rotated; anything else in checkpoints/
is left alone with one warning. Rotation deletes old checkpoints only after the new one is
committed, and never one newer than the one just written. Loading verifies the newest and falls
back to the previous one if it is damaged. This module reads commit records (JSON) only; the
checkpoint's files are read by shards.py.

This module knows nothing about process groups: the trainer decides which rank writes.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from distributed_train.errors import TrainingFailure, UsageError
from distributed_train.files import error_text, failure_text, path_problem

log = logging.getLogger("distributed_train")

MARKER = "COMMITTED"
TRAIN_STATE = "train_state.pt"  # rank 0's state beside the DCP shards
FORMAT_VERSION = 1
PROGRAM = "distributed_train"  # in every commit record: the record was written by this program
TMP_PREFIX = ".tmp-"


class CheckpointWriteFailed(TrainingFailure):
    """Writing a checkpoint failed (a full disk, say); the previous committed checkpoint is intact."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def commit_directory(directory: Path, step: int, write: Callable[[], None], fresh: bool = True,
                     known: dict | None = None) -> Path:
    """The commit protocol: `write()` fills `.tmp-step-N`, which is fsynced, renamed to `step-N`
    and committed with a record of its files' sizes and checksums (`known`: those the writers
    computed while writing, `known_facts`). On failure nothing of this write is left behind and
    CheckpointWriteFailed names the path; the previous checkpoints are untouched.
    `fresh=False`: the temporary folder already holds files written by every rank."""
    final = directory / checkpoint_name(step)
    tmp = directory / f"{TMP_PREFIX}{checkpoint_name(step)}"
    try:
        if fresh:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        write()
        for file in tmp.iterdir():  # cheap when the writer fsynced already; required when not
            _fsync_path(file)
        _fsync_path(tmp)
        if final.exists():  # an uncommitted leftover, or a re-save of the same step after a restart
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_path(directory)
        _commit(final, step, known)
    except OSError as exc:
        discard_failed_write(directory, step)
        raise CheckpointWriteFailed(f"writing checkpoint {final} failed: {error_text(exc)}; nothing of it was "
                                    "kept and the previous committed checkpoint is intact") from exc
    return final


def discard_failed_write(directory: Path, step: int) -> None:
    """Remove what a failed write of checkpoint `step` left: its temporary folder, and the folder
    itself if it was renamed but never committed (then it is not a checkpoint)."""
    final = directory / checkpoint_name(step)
    shutil.rmtree(directory / f"{TMP_PREFIX}{checkpoint_name(step)}", ignore_errors=True)
    if final.is_dir() and not (final / MARKER).is_file():
        shutil.rmtree(final, ignore_errors=True)


def new_record(step: int, files: dict) -> dict:
    """The commit record of checkpoint `step` whose files are {name: {"size", "sha256"}}."""
    return {"program": PROGRAM, "step": step, "format": FORMAT_VERSION, "time": time.time(), "files": files}


def file_facts(path: Path) -> dict:
    """{"size", "sha256"} of one file, as a commit record lists it."""
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def known_facts(path: Path, known: dict | None) -> dict:
    """`known[path.name]` (a checksum its writer computed while writing) when its size is the
    file's, else file_facts(path) (read and hashed now)."""
    facts = (known or {}).get(path.name)
    if facts is not None and facts["size"] == path.stat().st_size:
        return facts
    return file_facts(path)


def _commit(final: Path, step: int, known: dict | None = None) -> None:
    """Write the commit record (through a rename, so it is whole or absent)."""
    marker = new_record(step, {p.name: known_facts(p, known) for p in sorted(final.iterdir())})
    marker_tmp = final / f".{MARKER}.tmp"
    with open(marker_tmp, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    marker_tmp.rename(final / MARKER)
    _fsync_path(final)


def commit_record(path: Path, check_name: bool = True) -> dict | None:
    """The commit record of checkpoint folder `path` if this program wrote it, else None.

    Records from before the `program` field was added are accepted; `check_name` also requires
    the folder's name to be the one this program gives that step (a renamed copy is not one)."""
    try:
        record = parse_record((path / MARKER).read_text())
    except OSError:
        return None
    if record is None or (check_name and path.name != checkpoint_name(record["step"])):
        return None
    return record


def parse_record(text: str | bytes) -> dict | None:
    """A commit record's content if this program wrote it (in this format), else None."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("program", PROGRAM) != PROGRAM:
        return None
    step, files = record.get("step"), record.get("files")
    if type(step) is not int or step < 0 or record.get("format") != FORMAT_VERSION:
        return None
    if not isinstance(files, dict) or TRAIN_STATE not in files:
        return None
    return record


_warned: set[str] = set()  # foreign entries already reported by this process
_quiet = contextvars.ContextVar("dtrain_checkpoint_scan_quiet", default=False)


@contextlib.contextmanager
def quietly():
    """Scan checkpoints without the warnings about foreign entries and damaged checkpoints (for the
    launcher's check before the workers start: rank 0 says them once, when it resumes)."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def checkpoint_steps(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint this program committed under `directory`, oldest first
    (not yet verified). Other entries get one warning line per process and are never touched."""
    if not directory.is_dir():
        return []
    found, foreign = [], []
    for path in sorted(directory.iterdir()):
        record = commit_record(path) if path.is_dir() else None
        if record is not None:
            found.append((record["step"], path))
        elif not path.name.startswith("."):  # our own temporary folders, hidden files
            foreign.append(path.name)
    new = [name for name in foreign if str(directory / name) not in _warned]
    if new and not _quiet.get():
        _warned.update(str(directory / name) for name in new)
        log.warning("%s: ignoring %s (not a checkpoint this program committed; never used or deleted)",
                    directory, ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else ""))
    return sorted(found, key=lambda pair: pair[0])


def committed_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints this program committed under `directory`, oldest first (not yet verified)."""
    return [path for _, path in checkpoint_steps(directory)]


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else why not (missing marker, size or checksum)."""
    marker = commit_record(path, check_name=False)
    if marker is None:
        return f"no commit record written by this program ({MARKER})"
    try:
        for name, meta in marker["files"].items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != meta["size"]:
                return f"{name} has {file.stat().st_size} bytes, the marker says {meta['size']}"
            if sha256(file) != meta["sha256"]:
                return f"{name} fails its checksum"
    except (OSError, KeyError, TypeError) as exc:
        return f"unreadable commit marker ({exc})"
    return None


def latest_valid(directory: Path) -> Path | None:
    """The newest committed checkpoint that verifies; damaged ones are skipped with a warning."""
    for path in reversed(committed_checkpoints(directory)):
        problem = verify(path)
        if problem is None:
            return path
        if not _quiet.get():
            log.warning("skipping damaged checkpoint %s: %s", path, problem)
    return None


def rotate(directory: Path, keep_last: int, kept_step: int) -> None:
    """Keep checkpoint `kept_step` (just committed) and the `keep_last - 1` before it: delete older
    checkpoints of this program and its own stale temporary folders, nothing else, and never a
    checkpoint newer than the kept one."""
    older = [path for step, path in checkpoint_steps(directory) if step <= kept_step]
    for old in older[: max(0, len(older) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in directory.glob(f"{TMP_PREFIX}step-*"):  # a write killed half-way (one at a time)
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
        found = latest_valid(directory)
        committed = committed_checkpoints(directory)
        if found is None and committed:  # never a silent restart from step 0 over a damaged run
            raise UsageError(
                f"run_dir {str(run_dir)!r} has {len(committed)} committed checkpoint(s) and none verifies "
                f"(newest, {committed[-1].name}: {verify(committed[-1])}); restore them, or start over with "
                "checkpoint.resume=never checkpoint.overwrite=true")
        return found
    path = Path(resume)
    if problem := path_problem(path, "directory"):
        raise UsageError(f"checkpoint.resume={resume!r} {problem}: give a checkpoint directory or a run directory")
    if (path / "checkpoints").is_dir():  # a run directory: its latest checkpoint
        found = latest_valid(path / "checkpoints")
        if found is None:
            raise UsageError(f"checkpoint.resume={resume!r}: that run has no valid committed checkpoint")
        return found
    if commit_record(path, check_name=False) is None:
        raise UsageError(f"checkpoint.resume={resume!r} is not a committed checkpoint directory (no {MARKER} "
                         "written by this program)")
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
    """Runs checkpoint writes in a background thread, one at a time. A failed write is raised by
    `raise_if_failed()` at the next step boundary after it (or by `wait()`), naming its path."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_write_s = 0.0
        self.last_write_cpu_s = 0.0  # the background thread's CPU time (user and system) for that write

    def run(self, step: int, work: Callable[[], None]) -> None:
        """Run `work` (the write of checkpoint `step`) in the background, after the previous one."""
        self.wait()

        def background() -> None:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                self._error = exc
            self.last_write_s, self.last_write_cpu_s = time.perf_counter() - start, time.thread_time() - cpu

        self._thread = threading.Thread(target=background, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def raise_if_failed(self) -> None:
        """Raise the error of a write that has already ended; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until the pending write is committed; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, TrainingFailure):
                raise error
            raise CheckpointWriteFailed(f"writing a checkpoint failed ({type(error).__name__}: {failure_text(error)}); "
                                        "the previous committed checkpoint is intact") from error
