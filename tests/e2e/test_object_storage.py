"""The storage layer and the object-storage commit protocol against a real S3-compatible server
(tests/s3_server.py): what a crash between the uploads and the commit leaves, what listing and
rotation take, and one-line errors for a missing bucket or an unreachable endpoint."""

import logging

import pytest

from distributed_train.storage import StorageError, Store
from distributed_train.training.checkpoints import commit, remote
from tests.s3_server import s3  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


def _save(store, tmp_path, step, commit_it=True, payload=b"weights"):
    """One rank's files of checkpoint `step`, uploaded (and committed unless `commit_it` is False)."""
    local = tmp_path / f"local-{step}-{commit_it}"
    local.mkdir()
    (local / "__0_0.distcp").write_bytes(payload * step)
    (local / commit.TRAIN_STATE).write_bytes(b"state %d" % step)
    folder = remote.new_folder(step)
    files = remote.upload(store, folder, local, ["__0_0.distcp", commit.TRAIN_STATE])
    if commit_it:
        remote.commit_folder(store, folder, step, files)
    return folder


def test_only_committed_checkpoints_are_listed_and_a_crash_before_the_commit_keeps_the_previous(s3, tmp_path):  # noqa: F811
    store = Store("s3://runs/crash")
    first = _save(store, tmp_path, 10)
    _save(store, tmp_path, 20, commit_it=False)  # every shard uploaded, then the job died
    found, other = remote.committed(store)
    assert [(r.step, r.folder) for r in found] == [(10, first)] and len(other) == 1
    local = remote.download(store, found[-1], tmp_path / "restore")
    assert commit.verify(local) is None and commit.commit_record(local)["step"] == 10
    assert (local / "__0_0.distcp").read_bytes() == b"weights" * 10


def test_a_commit_record_is_created_once(s3, tmp_path):  # noqa: F811
    store = Store("s3://runs/once")
    folder = _save(store, tmp_path, 5)
    with pytest.raises(StorageError, match=r"s3://runs/once/checkpoints/step-00000005-\w+ was committed by another "
                                           "writer"):
        remote.commit_folder(store, folder, 5, {})
    assert [r.step for r in remote.committed(store)[0]] == [5]


def test_rotation_deletes_older_committed_and_unfinished_saves_never_a_newer_one(s3, tmp_path):  # noqa: F811
    store = Store("s3://runs/rotate")
    for step in (1, 2, 3):
        _save(store, tmp_path, step)
    _save(store, tmp_path, 4, commit_it=False)
    newer = _save(store, tmp_path, 9)  # e.g. written by a longer run before train.max_steps was lowered
    remote.rotate(store, keep_last=2, kept_step=3)
    found, other = remote.committed(store)
    assert [r.step for r in found] == [2, 3, 9] and other == [] and found[-1].folder == newer


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_damaged_checkpoint_is_skipped_and_a_changed_object_fails_its_checksum(s3, tmp_path):  # noqa: F811
    store = Store("s3://runs/damaged")
    _save(store, tmp_path, 1)
    gone = _save(store, tmp_path, 2)
    store.delete([f"checkpoints/{gone}/__0_0.distcp"])
    warnings = _Lines()  # the package's logger may not propagate (a job ran in this process)
    logging.getLogger("distributed_train").addHandler(warnings)
    try:
        found, _ = remote.committed(store)
    finally:
        logging.getLogger("distributed_train").removeHandler(warnings)
    assert [r.step for r in found] == [1]
    assert any(line.startswith("skipping damaged checkpoint s3://runs/damaged/checkpoints/step-00000002-")
               for line in warnings.lines), warnings.lines
    store.put_bytes(f"checkpoints/{found[0].folder}/__0_0.distcp", b"WEIGHTS")  # same size, other bytes
    with pytest.raises(StorageError, match="__0_0.distcp fails its checksum"):
        remote.download(store, found[0], tmp_path / "restore")
    assert not (tmp_path / "restore" / "step-00000001").exists()


def test_a_missing_bucket_and_an_unreachable_endpoint_are_one_line_naming_the_url(s3, monkeypatch):  # noqa: F811
    with pytest.raises(StorageError) as missing:
        Store("s3://no-such-bucket/run").check_writable()
    assert str(missing.value) == ("writing s3://no-such-bucket/run/.dtrain-probe failed: the specified bucket does "
                                  "not exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import fsspec

    fsspec.config.conf.setdefault("s3", {})["skip_instance_cache"] = True
    try:
        with pytest.raises(StorageError) as unreachable:
            Store("s3://runs/x").check_writable()
    finally:
        fsspec.config.conf["s3"].pop("skip_instance_cache")
    assert str(unreachable.value).startswith("writing s3://runs/x/.dtrain-probe failed: cannot connect"), \
        unreachable.value
    assert "\n" not in str(unreachable.value)
