"""The commit protocol on object storage, where there is no rename: a checkpoint is committed
when its commit record exists, and the record is created last, with a conditional write.

Layout under the run's URL:
    checkpoints/step-00000120-<save id>/.metadata, __0_0.distcp, ..., train_state.pt, COMMITTED

Each save goes to a folder of its own (the save id), so that uploading a step again (a restart
that reached the same step) never overwrites the objects of a committed checkpoint. Every rank
uploads the files it wrote itself, with their sizes and sha256 (nothing is gathered on one rank
but those facts); then one rank creates COMMITTED (the record format of the local protocol,
commit.py) only if it does not exist. A crash before that leaves the folder uncommitted: never
listed, never loaded, deleted by the next rotation. Listing takes a folder only when its record
parses and every object it lists exists at its recorded size; downloading checks every sha256.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from distributed_train.errors import UsageError
from distributed_train.storage import StorageError, Store
from distributed_train.training.checkpoints import commit

log = logging.getLogger("distributed_train")

PREFIX = "checkpoints"


class DamagedCheckpoint(StorageError):
    """A downloaded object of a committed checkpoint does not match its commit record."""


@dataclass
class Remote:
    """One committed checkpoint in the store: its step, folder (below checkpoints/) and record."""

    step: int
    folder: str
    record: dict

    def url(self, store: Store) -> str:
        return store.url_of(f"{PREFIX}/{self.folder}")


def new_folder(step: int) -> str:
    """The folder of one save of `step`: the step's name and an id no other save has."""
    return f"{commit.checkpoint_name(step)}-{secrets.token_hex(4)}"


def upload(store: Store, folder: str, local_dir: Path, names: list[str], known: dict | None = None) -> dict:
    """Upload the files `names` of `local_dir` into `folder`; returns their {name: {size, sha256}}
    (what the commit record lists), computed for those not `known` already (commit.known_facts)."""
    facts = {}
    for name in names:
        facts[name] = commit.known_facts(local_dir / name, known)
        store.put_file(str(local_dir / name), f"{PREFIX}/{folder}/{name}")
    return facts


def commit_folder(store: Store, folder: str, step: int, files: dict) -> None:
    """Create the commit record of `folder` last, only if none exists (one writer wins)."""
    record = json.dumps(commit.new_record(step, files), indent=1).encode()
    if not store.put_bytes(f"{PREFIX}/{folder}/{commit.MARKER}", record, create=True):
        raise StorageError(f"{store.url_of(f'{PREFIX}/{folder}')} was committed by another writer; "
                           "two jobs are writing this run directory")


def _folders(store: Store) -> dict[str, dict[str, int]]:
    """{folder: {object name: size}} of everything under checkpoints/."""
    folders: dict[str, dict[str, int]] = {}
    for key, size in store.sizes(PREFIX).items():
        folder, _, name = key.partition("/")
        if name and "/" not in name:
            folders.setdefault(folder, {})[name] = size
    return folders


def committed(store: Store, folders: dict[str, dict[str, int]] | None = None) -> tuple[list[Remote], list[str]]:
    """(committed checkpoints oldest first, the other folders: uncommitted, damaged or foreign);
    `folders`: a listing (`_folders`) the caller already has."""
    found, other = [], []
    for folder, objects in sorted((_folders(store) if folders is None else folders).items()):
        record = None
        if commit.MARKER in objects:
            record = commit.parse_record(store.get_bytes(f"{PREFIX}/{folder}/{commit.MARKER}") or b"")
        if record is None or not folder.startswith(commit.checkpoint_name(record["step"]) + "-"):
            other.append(folder)
            continue
        missing = [name for name, meta in record["files"].items() if objects.get(name) != meta.get("size")]
        if missing:
            log.warning("skipping damaged checkpoint %s: %s missing or of another size",
                        store.url_of(f"{PREFIX}/{folder}"), ", ".join(sorted(missing)[:5]))
            other.append(folder)
            continue
        found.append(Remote(record["step"], folder, record))
    return sorted(found, key=lambda remote: (remote.step, remote.record.get("time", 0))), other


def download(store: Store, remote: Remote, into: Path) -> Path:
    """Copy checkpoint `remote` to `into`/step-N (its commit record too, so the local protocol
    verifies and loads it); every file's sha256 is checked. Several processes may download the
    same checkpoint into one folder at once: each fills a folder of its own, renamed into place.
    Returns the local folder."""
    local = into / commit.checkpoint_name(remote.step)
    for old in into.glob("step-*"):  # earlier downloads: the bucket holds them
        if old != local:
            shutil.rmtree(old, ignore_errors=True)
    staging = into / f"{commit.TMP_PREFIX}download-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        for name, meta in remote.record["files"].items():
            store.get_file(f"{PREFIX}/{remote.folder}/{name}", str(staging / name))
            if commit.sha256(staging / name) != meta["sha256"]:
                raise DamagedCheckpoint(f"{remote.url(store)}/{name} fails its checksum")
        (staging / commit.MARKER).write_text(json.dumps(remote.record, indent=1))
        if local.exists() and commit.commit_record(local) != remote.record:
            shutil.rmtree(local, ignore_errors=True)  # an older download, or another checkpoint of the step
        try:
            staging.rename(local)
        except OSError:  # another process put the same checkpoint there first
            if commit.commit_record(local) != remote.record:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def resolve_resume(store: Store, resume: str, overwrite: bool) -> list[Remote]:
    """The checkpoints in the bucket to start from for `checkpoint.resume` auto / never, newest
    first (the next is taken when one fails its checksums), or none (the rules of
    commit.resolve_resume for a local run directory)."""
    try:
        folders = _folders(store)
        found, other = committed(store, folders)
    except StorageError as exc:
        raise UsageError(f"run_dir {store.url!r}: {exc}") from None
    if resume == "never":
        if found and not overwrite:
            raise UsageError(f"run_dir {store.url!r} already has checkpoints; use checkpoint.resume=auto to "
                             "continue it, or checkpoint.overwrite=true to start over and replace them")
        return []
    damaged = [folder for folder in other if folder.startswith("step-") and commit.MARKER in folders[folder]]
    if not found and damaged:
        raise UsageError(f"run_dir {store.url!r} has committed checkpoints and none is whole ({damaged[-1]} "
                         "and older); restore them, or start over with checkpoint.resume=never "
                         "checkpoint.overwrite=true")
    return found[::-1]


def rotate(store: Store, keep_last: int, kept_step: int) -> None:
    """Keep the checkpoint of `kept_step` (just committed) and the `keep_last - 1` committed ones
    before it; delete older committed ones and every uncommitted folder (a save that never
    finished: one job writes a run directory, one save at a time). Never a newer checkpoint."""
    objects = _folders(store)  # one listing for the choice and the deletion
    found, _ = committed(store, objects)
    older = [remote for remote in found if remote.step <= kept_step]
    uncommitted = [folder for folder, names in objects.items() if commit.MARKER not in names]
    doomed = [remote.folder for remote in older[: max(0, len(older) - keep_last)]] + uncommitted
    store.delete([f"{PREFIX}/{folder}/{name}" for folder in doomed for name in objects.get(folder, {})])
