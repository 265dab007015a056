"""A run directory in object storage (`run_dir=s3://bucket/prefix`, any fsspec URL): the bucket is
the run directory, and each node works in a local folder of its own.

What lives where:
- the bucket: `config.yaml` (at the start), the checkpoints (each rank uploads its own shard, the
  commit record last: checkpoints/remote.py), `metrics.jsonl` (uploaded whole every
  `storage.upload_every_s`, after each checkpoint, so that the bucket's copy reaches the point a
  later attempt resumes from even when this node is lost, and at the end), `final_model.pt`,
  `summary.json`, and `.dtrain.lock`;
- the local folder (`storage.cache_dir`/<scheme>/<bucket>/<prefix>, on every node): what the job
  writes before it goes up (metrics.jsonl is appended there as for a local run: a lost connection
  never loses it), the shards of a checkpoint being uploaded, the checkpoint a resume downloaded,
  wandb's files and profiler traces. Nothing there is needed to resume: a job on another node, or
  after this node is gone, resumes from the bucket.

One job per run directory: rank 0 creates the lock object with a conditional write (holder host,
pid, start time, heartbeat time) and refreshes its heartbeat while the job runs; a second job
exits 2 naming the holder; a lock whose heartbeat is older than `storage.lock_stale_s` is stale
(its job died without removing it, or lost the bucket that long) and is taken over. A job that
finds its lock taken over uploads nothing more and stops before its next checkpoint (exit 2): the
other job owns the run now. On S3 the takeover is conditional too
(If-Match on the stale lock's ETag: of two jobs taking over, one wins); where a store has no
conditional writes, two jobs that take over the same stale lock at once are not told apart.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path

from distributed_train import distributed
from distributed_train.config import StorageConfig
from distributed_train.errors import UsageError
from distributed_train.storage import StorageError, Store
from distributed_train.training.reporting.metrics import log
from distributed_train.training.run_lock import LOCK_FILE, describe_holder

METRICS = "metrics.jsonl"
RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml")  # what `dtrain runs` and `dtrain plot` read


def fetch_run(url: str, into: Path) -> Path:
    """Copy the small files of the run directory at `url` (those it has, with their modification
    times) into local folder `into`, for the commands that read a run; raises StorageError."""
    store = Store(url)
    into.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        store.get_if_exists(name, str(into / name))
    return into


def find_runs(url: str, max_depth: int) -> list[str]:
    """The run directories under `url` (or `url` itself), as paths below it ("" for itself): the
    prefixes that hold a metrics.jsonl or summary.json, at most `max_depth` folders down."""
    found = set()
    for key in Store(url).sizes():
        folder, _, name = key.rpartition("/")
        if name in ("metrics.jsonl", "summary.json") and (folder.count("/") + 1 if folder else 0) <= max_depth:
            found.add(folder)
    if "" in found:
        return [""]  # the URL is a run directory itself: its folders are its own
    return sorted(run for run in found if not any(run.startswith(other + "/") for other in found))


def local_folder(url: str, cache_dir: str) -> Path:
    """The local working folder of run directory `url` on this node."""
    root = Path(cache_dir or os.environ.get("DTRAIN_CACHE_DIR") or Path.home() / ".cache" / "dtrain").expanduser()
    scheme, _, rest = url.partition("://")
    parts = [re.sub(r"[^\w.-]", "_", part) for part in rest.strip("/").split("/") if part not in ("", ".", "..")]
    return root / "runs" / scheme / Path(*parts) if parts else root / "runs" / scheme


class RunMirror:
    """The bucket side of one run: checks, the lock object, uploads (rank 0), metrics in batches."""

    def __init__(self, url: str, env: distributed.DistEnv, settings: StorageConfig):
        self.url, self.env, self.settings = url.rstrip("/"), env, settings
        self.local = local_folder(url, settings.cache_dir)
        try:
            self.store = Store(self.url)
        except StorageError as exc:
            raise UsageError(f"run_dir {url!r}: {exc}") from None
        self._lock_record: dict | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._wake = threading.Event()  # set to upload the metrics at once, or to stop
        self._uploaded_metrics = -1  # size of metrics.jsonl at its last upload
        self._warned = False
        self.lock_lost = False  # rank 0: another job took the lock over; nothing more is uploaded
        self._taker: dict = {}  # that job's lock record

    def open(self) -> None:
        """Rank 0, before anything is written: the store answers and takes writes, and this job
        holds the run's lock object. A UsageError (exit 2) names the URL and the problem."""
        try:
            self.store.check_writable()
            self._acquire_lock()
            self._continue_metrics()
        except StorageError as exc:
            raise UsageError(f"run_dir {self.url!r}: {exc}") from None
        self._thread = threading.Thread(target=self._background, name="run-dir-uploads", daemon=True)
        self._thread.start()

    def upload(self, name: str) -> None:
        """Rank 0: the local file `name` of the run folder, uploaded whole (raises StorageError)."""
        self.store.put_file(str(self.local / name), name)

    def check_lock(self) -> None:
        """Rank 0, before each checkpoint and the final outputs: a UsageError once another job took
        this job's lock over."""
        if self.lock_lost:
            raise UsageError(f"run_dir {self.url!r} was taken over by another job ({describe_holder(self._taker)}) "
                             "after this job's lock went without a heartbeat for storage.lock_stale_s="
                             f"{self.settings.lock_stale_s:g} s: stopping, so that two jobs do not write one run "
                             f"directory; this job's metrics stay in {self.local / METRICS}")

    def upload_metrics_soon(self) -> None:
        """Rank 0: upload metrics.jsonl now, in the background (after a checkpoint), not at the next
        batch."""
        self._wake.set()

    def close(self) -> None:
        """Rank 0: the last metrics upload, and the lock object removed. Never raises: a failure is
        one warning (the local copy stays)."""
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join()
            self._thread = None
            self._upload_metrics()
        if self._lock_record is None:
            return  # never held (the job stopped before, or another job holds it)
        try:
            if self._lock_is_ours():
                self.store.delete([LOCK_FILE])
        except StorageError as exc:
            log.warning("%s; the lock goes stale after storage.lock_stale_s", exc)

    def _continue_metrics(self) -> None:
        """metrics.jsonl holds every attempt of the run: an attempt on a node whose local folder is
        new (or behind) continues the bucket's copy; a local copy longer than the bucket's (its
        last upload failed) is kept."""
        local = self.local / METRICS
        in_bucket = self.store.size(METRICS)
        if in_bucket is not None and in_bucket > (local.stat().st_size if local.exists() else -1):
            self.local.mkdir(parents=True, exist_ok=True)
            self.store.get_file(METRICS, str(local))

    # -- metrics in batches, and the lock's heartbeat ------------------------------------------
    def _background(self) -> None:
        every = self.settings.upload_every_s
        next_batch = time.monotonic() + every
        while True:
            self._wake.wait(max(0.0, next_batch - time.monotonic()))
            self._wake.clear()
            if self._stop:
                return
            if time.monotonic() >= next_batch:
                self._heartbeat()  # first: a lock another job took over is found before an upload
                next_batch = time.monotonic() + every
            self._upload_metrics()

    def _upload_metrics(self) -> None:
        if self.lock_lost:
            return  # the bucket's metrics.jsonl is the other job's now
        path = self.local / METRICS
        try:
            size = path.stat().st_size
        except OSError:
            return
        if size == self._uploaded_metrics:
            return
        try:
            self.upload(METRICS)
            self._uploaded_metrics = size
        except StorageError as exc:
            if not self._warned:
                self._warned = True
                log.warning("%s; metrics go on in %s and are uploaded again later", exc, path)

    # -- the lock object -----------------------------------------------------------------------
    def _record(self) -> dict:
        now = time.time()
        started = self._lock_record["started"] if self._lock_record else now
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "heartbeat": now,
                "token": self._lock_record["token"] if self._lock_record else os.urandom(8).hex()}

    def _acquire_lock(self) -> None:
        record = self._record()
        if self.store.put_bytes(LOCK_FILE, json.dumps(record).encode(), create=True):
            self._lock_record = record
            return
        holder, tag = self._read_lock()
        age = time.time() - holder.get("heartbeat", 0) if isinstance(holder.get("heartbeat"), (int, float)) \
            else float("inf")
        if age <= self.settings.lock_stale_s:
            raise UsageError(f"run_dir {self.url!r} is in use by another job ({describe_holder(holder)}, "
                             f"last heartbeat {age:.0f} s ago); wait for it to end, or give this job another "
                             f"run_dir (a lock without a heartbeat for storage.lock_stale_s="
                             f"{self.settings.lock_stale_s:g} s is taken over)")
        if not self._replace_lock(record, tag):
            raise UsageError(f"run_dir {self.url!r}: another job took over its stale lock at the same time; "
                             "give this job another run_dir")
        log.warning("run_dir %s: took over a stale lock (%s, no heartbeat for %.0f s)", self.url,
                    describe_holder(holder), age)
        self._lock_record = record

    def _read_lock(self) -> tuple[dict, str | None]:
        data, tag = self.store.get_tagged(LOCK_FILE)
        try:
            holder = json.loads(data or b"{}")
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), tag

    def _replace_lock(self, record: dict, tag: str | None) -> bool:
        """Overwrite the stale lock; on S3 only if it is still the one read (If-Match)."""
        return self.store.replace_if_unchanged(LOCK_FILE, json.dumps(record).encode(), tag)

    def _lock_is_ours(self) -> bool:
        holder, _ = self._read_lock()
        return bool(self._lock_record) and holder.get("token") == self._lock_record["token"]

    def _heartbeat(self) -> None:
        """Refresh the lock's heartbeat, only if the lock is still this job's: on S3 the write is
        conditional on the version just read (If-Match), so a takeover in between is not undone."""
        try:
            holder, tag = self._read_lock()
            record = self._record()
            if holder.get("token") != record["token"] or \
                    not self.store.replace_if_unchanged(LOCK_FILE, json.dumps(record).encode(), tag):
                if not self.lock_lost:
                    # A conditional write that failed on our own record: another job wrote the lock since.
                    taker = holder if holder.get("token") != record["token"] else self._read_lock()[0]
                    self.lock_lost, self._taker = True, taker
                    log.warning("run_dir %s: this job's lock was taken over by another job (%s; this job's "
                                "heartbeat went stale): nothing more is uploaded, and the job stops before its "
                                "next checkpoint", self.url, describe_holder(holder))
                return
            self._lock_record = record
        except StorageError as exc:
            log.warning("%s; the lock's heartbeat is retried in %g s", exc, self.settings.upload_every_s)
