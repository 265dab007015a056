"""One job per run directory: rank 0 holds an exclusive lock on run_dir/.dtrain.lock for the job.

The lock is `flock`: the kernel releases it when the process ends however it ends (SIGKILL, OOM
killer), so a stale lock file from a dead job never blocks a resume. The file also records the
holder (host, pid, start time) for the error a second job prints. On NFS, Linux implements
flock with POSIX byte-range locks, which the server arbitrates across hosts (NFSv4, or v3 with
lockd). Where the file system refuses locks (ENOLCK / EOPNOTSUPP, e.g. some FUSE or SMB
mounts), the holder file alone is the fallback: a job whose recorded holder is a live process on
this host is refused; otherwise the job goes on with a warning that it could not lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from distributed_train import distributed
from distributed_train.errors import UsageError
from distributed_train.files import make_directory, open_no_follow
from distributed_train.training.reporting.metrics import log

LOCK_FILE = ".dtrain.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def describe_holder(holder: dict) -> str:
    """`pid 123 on host, started 2025-01-01 12:00:00` from a lock file's record."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) \
        else "at an unknown time"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive_here(holder: dict) -> bool:
    """True when `holder` names a running process on this host."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return holder["pid"] != os.getpid()


class RunLock:
    """Context manager: rank 0 locks run_dir for the job (collective on enter: every rank learns
    whether the directory is free); released on exit, or by the kernel when the process dies."""

    def __init__(self, run_dir: Path, env: distributed.DistEnv, bucket_lock: Callable[[], None] | None = None):
        self.run_dir, self.env = Path(run_dir), env
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self.bucket_lock = bucket_lock  # with a run_dir URL: raises once another job took the bucket's lock

    def __enter__(self) -> "RunLock":
        distributed.main_computes(self.env, self.acquire)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Lock run_dir or raise UsageError naming the directory and the job that holds it."""
        make_directory(self.run_dir, "run_dir")
        try:
            fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise UsageError(f"run_dir {str(self.run_dir)!r} is not writable: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UsageError(f"run_dir {str(self.run_dir)!r} is in use by another job ({describe_holder(holder)}); "
                             "wait for it to end, or give this job another run_dir") from None
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            self._fallback(fd)
        self._fd = fd
        self._write_holder(fd)

    def _fallback(self, fd: int) -> None:
        """No locks on this file system: trust the holder file as far as this host can check it."""
        holder = _read_holder(fd)
        if _alive_here(holder):
            os.close(fd)
            raise UsageError(f"run_dir {str(self.run_dir)!r} is in use by another job ({describe_holder(holder)}); "
                             "wait for it to end, or give this job another run_dir")
        log.warning("run_dir %s: this file system does not support locks; make sure no other job uses "
                    "this run_dir (the lock file names the last job: %s)", self.run_dir,
                    describe_holder(holder) if holder else "none")

    def _write_holder(self, fd: int) -> None:
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode() + b"\n", 0)
        except OSError:  # the record is for the error message only; the lock itself is held
            pass

    def verify(self) -> None:
        """Collective: stop every rank with one line if run_dir was deleted or replaced under the job
        (its lock went with it, so another job could take the folder; files written now are lost),
        or if another job took over the lock of a run directory in a bucket."""
        distributed.main_computes(self.env, self._check_still_held)

    def _check_still_held(self) -> None:
        if self.bucket_lock is not None:
            self.bucket_lock()
        if self._fd is None:
            return
        held = os.fstat(self._fd)
        try:
            now = os.stat(self.path, follow_symlinks=False)
            same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
        except OSError:
            same = False
        if not same:
            raise UsageError(f"run_dir {str(self.run_dir)!r} was deleted or replaced while this job ran (its "
                             f"{LOCK_FILE} is not the one this job holds): stopping, since what it writes there "
                             "now could be lost or mixed with another job's; restore the folder or start again")

    def release(self) -> None:
        """Drop the lock (the file stays: unlinking it could let two jobs lock different files)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
