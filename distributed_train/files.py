"""Writing an output file whole or not at all: a full disk, a read-only folder or a missing one is
one line naming the path and the OS error, and no partial file is left under any name."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from distributed_train.errors import UsageError


def error_text(exc: BaseException) -> str:
    """An I/O error in the words of a one-line message: the OS's text lowercased ("no space left on
    device"), else the exception's first line, else its type."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].lower()


def os_error_in(exc: BaseException) -> OSError | None:
    """The first OSError among `exc`, what it was raised from or while handling (torch.save raises
    its own RuntimeError, "unexpected pos 704 vs 598", for a write the disk refused) and the ranks'
    failures that DCP's CheckpointException holds (`failures`: rank -> (exception, traceback))."""
    pending: list = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [failure[0] for failure in failures.values() if isinstance(failure, tuple) and failure]
        pending += [current.__cause__, current.__context__]
    return None


def failure_text(exc: BaseException) -> str:
    """A failed write in one line: `error_text` of the OSError behind it (`os_error_in`), else of
    `exc` (of its first rank's failure, for DCP's CheckpointException)."""
    found = os_error_in(exc)
    if found is None:
        failures = getattr(exc, "failures", None)
        first = next(iter(failures.values()), None) if isinstance(failures, dict) else None
        found = first[0] if isinstance(first, tuple) and first else exc
    return error_text(found)


@contextlib.contextmanager
def disk_errors() -> Iterator[None]:
    """A write the disk refused is raised as the OSError it was (so every `except OSError` of the
    commit protocol sees it): DCP raises a rank's inside its CheckpointException, a BaseException
    holding every rank's failure; torch.save its own RuntimeError. Other failures pass as they are."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException is one
        found = os_error_in(exc)
        if found is None or found is exc:
            raise
        raise OSError(*found.args) from exc


def atomic_write(path: Path, write: Callable[[BinaryIO], None], what: str = "") -> None:
    """`write(f)` into `path`'s temporary sibling, fsynced, then renamed over `path`.

    Any failure removes the temporary file and raises UsageError naming `path` (and `what` it is);
    a file already at `path` stays as it was until the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover, or a planted link (unlinking removes the link only)
        # A fresh file, never opened through a link; the rename below replaces `path` itself, so a
        # link planted there is replaced, not followed.
        with open(tmp, "xb", opener=open_no_follow) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's writers raise RuntimeError for some I/O errors
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise UsageError(f"cannot write {what + ' ' if what else ''}{path}: {failure_text(exc)}") from exc


def path_problem(path: str | Path, want: str) -> str | None:
    """Why `path` is not an existing `want` ("file" or "directory"), in words that tell a folder
    given for a file (and the reverse) from a path that does not exist; None when it is one."""
    path = Path(path).expanduser()
    if (path.is_file() if want == "file" else path.is_dir()):
        return None
    if path.is_dir():
        return "is a directory, not a file"
    if path.exists():
        return "is a file, not a directory" if want == "directory" else "is not a regular file"
    blocker = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    return f"does not exist ({str(blocker)!r} is a file, not a directory)" if blocker else "does not exist"


def require(path: str | Path, want: str, what: str) -> None:
    """UsageError `<what> '<path>' <problem>` unless `path` is an existing `want`."""
    problem = path_problem(path, want)
    if problem:
        raise UsageError(f"{what} {str(path)!r} {problem}")


def make_directory(path: str | Path, what: str) -> None:
    """Create the directory `path` and its parents; a file in the way or a folder that cannot be
    written is one line naming `what` it is."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = path_problem(path, "directory") or ""
        if problem.startswith("does not exist (") or problem.startswith("is a file"):
            problem = problem.replace("does not exist (", "cannot be created (")
        else:
            problem = f"is not writable: {error_text(exc)}"
        raise UsageError(f"{what} {str(path)!r} {problem}") from None


def open_no_follow(path: str | Path, flags: int) -> int:
    """os.open(path, flags), never through a symbolic link planted at `path` (it would truncate or
    overwrite whatever it points at): a link there is one line. Other OSErrors are the caller's."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{path} is a symbolic link; refused: dtrain never writes through a link in a "
                             "run directory (remove it)") from None
        raise


def atomic_write_text(path: Path, text: str, what: str = "") -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode()), what)
