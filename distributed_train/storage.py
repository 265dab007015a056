"""Object storage through fsspec: `s3://bucket/prefix` (s3fs), `gs://`, `az://`, `file://`, with
one-line errors that name the URL.

An object store has no rename and no append; what stands in for them here is a conditional
create (`put_bytes(..., create=True)`: S3's `If-None-Match: *`, a local `O_EXCL` open): it
succeeds for exactly one writer and tells the others the object exists. Listings are read fresh
every time (never from fsspec's cache: another process may have written since).

Credentials come only from each library's standard places (environment variables such as
`AWS_ACCESS_KEY_ID` and `AWS_ENDPOINT_URL`, profiles, instance or pod identity); nothing here
takes, stores or prints them.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

from distributed_train.files import error_text

log = logging.getLogger("distributed_train")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, file://, https://


def is_url(value: object) -> bool:
    return isinstance(value, str) and bool(URL.match(value))


def has_credentials(url: str) -> bool:
    """`s3://key:secret@bucket/x`: a URL that would put credentials in config.yaml and the logs."""
    return "@" in url.split("://", 1)[-1].split("/", 1)[0]


class StorageError(Exception):
    """An object-store operation failed; the message names the URL and the error in one line."""


def _reason(exc: BaseException) -> str:
    """botocore's and aiohttp's errors in one line: the service's text, else the OS's."""
    text = error_text(exc)
    if "could not connect" in text or "connect" in type(exc).__name__.lower():
        return f"cannot connect ({text})"
    return text


@contextlib.contextmanager
def _named(url: str, what: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except ImportError as exc:  # s3fs, gcsfs, adlfs: the protocol's library
        raise StorageError(f"{url}: {exc}; install the extra for it (pip install 'distributed-train[s3]' "
                           "for s3://)") from exc
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, OSError: every failure is one line
        raise StorageError(f"{what} {url} failed: {_reason(exc)}") from exc


def _quiet_event_loop(fs) -> None:
    """fsspec runs an async file system (s3fs, gcsfs) on an event loop of its own; when a connection
    drops, aiohttp may leave a task whose error nobody reads, and asyncio prints its traceback on
    stderr. The operation that failed raises anyway (one line, above): such leftovers go to the
    debug log."""
    from fsspec.asyn import AsyncFileSystem

    if isinstance(fs, AsyncFileSystem):
        fs.loop.set_exception_handler(lambda loop, context: log.debug("storage: %s", context.get("message")))


class Store:
    """The objects under one URL prefix; keys are '/'-separated paths below it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        with _named(self.url, "opening"):
            from fsspec.core import url_to_fs

            self.fs, self.root = url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        if self.fs.protocol in ("file", ("file", "local")):  # file://: folders appear as objects are written
            self.fs.auto_mkdir = True
        _quiet_event_loop(self.fs)

    def url_of(self, key: str = "") -> str:
        return f"{self.url}/{key}" if key else self.url

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def check_writable(self) -> None:
        """Write and delete a probe object: a missing bucket, refused credentials or an unreachable
        endpoint is a StorageError before anything else is written."""
        probe = ".dtrain-probe"
        with _named(self.url_of(probe), "writing"):
            self.fs.pipe_file(self._path(probe), b"")
        with _named(self.url_of(probe), "deleting"):
            self.fs.rm_file(self._path(probe))

    def put_bytes(self, key: str, data: bytes, create: bool = False) -> bool:
        """Write object `key` whole; `create`: only if it does not exist (False when it did)."""
        with _named(self.url_of(key), "writing"):
            try:
                self.fs.pipe_file(self._path(key), data, mode="create" if create else "overwrite")
            except FileExistsError:
                if create:
                    return False
                raise
        return True

    def put_file(self, local: str, key: str) -> None:
        """Upload local file `local` as object `key` (whole: an object appears complete or not at all)."""
        with _named(self.url_of(key), "uploading to"):
            self.fs.put_file(str(local), self._path(key))

    def get_bytes(self, key: str) -> bytes | None:
        """Object `key`'s content, or None when it does not exist."""
        with _named(self.url_of(key), "reading"):
            try:
                return self.fs.cat_file(self._path(key))
            except FileNotFoundError:
                return None

    def size(self, key: str) -> int | None:
        """Object `key`'s size in bytes, or None when it does not exist."""
        with _named(self.url_of(key), "reading"):
            try:
                return int(self.fs.info(self._path(key)).get("size") or 0)
            except FileNotFoundError:
                return None

    def get_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """Object `key`'s content and version tag (S3's ETag), or (None, None) when it does not exist."""
        with _named(self.url_of(key), "reading"):
            try:
                tag = self.fs.info(self._path(key)).get("ETag")
                return self.fs.cat_file(self._path(key)), tag
            except FileNotFoundError:
                return None, None

    def replace_if_unchanged(self, key: str, data: bytes, tag: str | None) -> bool:
        """Overwrite object `key` only if its version is still `tag` (S3: If-Match); False when
        another writer changed it first. A store without the condition overwrites it."""
        call = getattr(self.fs, "call_s3", None)
        if call is None or tag is None:
            return self.put_bytes(key, data)
        bucket, path, _ = self.fs.split_path(self._path(key))
        with _named(self.url_of(key), "writing"):
            try:
                call("put_object", Bucket=bucket, Key=path, Body=data, IfMatch=tag)
            except (FileExistsError, FileNotFoundError):  # s3fs's translation of 412 / 404
                return False
            except OSError as exc:
                if "precondition" in str(exc).lower():
                    return False
                raise
        return True

    def get_if_exists(self, key: str, local: str) -> bool:
        """Download object `key` to `local` with its modification time; False when it does not exist."""
        import os

        with _named(self.url_of(key), "downloading"):
            try:
                modified = self.fs.modified(self._path(key)).timestamp()
                self.fs.get_file(self._path(key), str(local))
            except FileNotFoundError:
                return False
        os.utime(local, (modified, modified))
        return True

    def get_file(self, key: str, local: str) -> None:
        with _named(self.url_of(key), "downloading"):
            self.fs.get_file(self._path(key), str(local))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{key below `prefix`: size} of every object under `prefix`, listed fresh."""
        base = self._path(prefix)
        with _named(self.url_of(prefix), "listing"):
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
        out = {}
        for path, info in found.items():
            if info.get("type", "file") == "file":
                out[path[len(base):].lstrip("/")] = int(info.get("size") or 0)
        return out

    def delete(self, keys: list[str]) -> None:
        with _named(self.url, "deleting under"):
            if keys:
                self.fs.rm([self._path(key) for key in keys])
