"""`dtrain prepare-tokens`: byte and Hugging Face tokenizers, streaming split, shards, refusals."""

import errno
import io
import json
import os
import sys

import numpy as np
import pytest

from distributed_train.cli import main as dtrain
from distributed_train.cli import prepare_tokens
from distributed_train.tasks.lm import LMTask


def read_split(directory, split):
    meta = json.loads((directory / "meta.json").read_text())
    parts = [np.fromfile(directory / name, dtype=meta["dtype"]) for name, _ in meta["splits"][split]["shards"]]
    return meta, np.concatenate(parts) if parts else np.array([], dtype=np.uint16)


def test_byte_tokens_split_into_shards_and_blocks_then_the_lm_task_reads_them(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_tokens, "SPLIT_BLOCK_TOKENS", 100)
    monkeypatch.setattr(prepare_tokens, "CHUNK_BYTES", 64)  # many chunks through the streaming path
    text = ("In the beginning: unicode. " * 200).encode()  # 5,400 bytes = 54 blocks of 100
    (tmp_path / "a.txt").write_bytes(text[:3000])
    (tmp_path / "b.txt").write_bytes(text[3000:])
    out = tmp_path / "tokens"
    assert dtrain(["prepare-tokens", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "-o", str(out),
                   "--val-fraction", "0.1", "--shard-tokens", "1000"]) == 0
    meta, train = read_split(out, "train")
    _, val = read_split(out, "val")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 256 and meta["tokenizer"] == {"kind": "byte"}
    blocks = [np.frombuffer(text, np.uint8)[i:i + 100] for i in range(0, len(text), 100)]
    val_blocks = [k for k in range(54) if prepare_tokens.is_val_block(k, 0.1)]
    assert val_blocks == [4, 14, 24, 34, 44]  # a tenth, spread evenly
    assert np.array_equal(val, np.concatenate([blocks[k] for k in val_blocks]))
    assert np.array_equal(train, np.concatenate([b for k, b in enumerate(blocks) if k not in val_blocks]))
    assert [count for _, count in meta["splits"]["train"]["shards"]] == [1000] * 4 + [900]
    assert meta["splits"]["val"]["tokens"] == 500 and not list(out.glob("*.tmp"))
    task = LMTask(type("Config", (), {"task_args": {"data": str(out), "seq_len": 9}}))
    assert (len(task.train_dataset()), len(task.eval_dataset()), task.vocab_size) == (490, 50, 256)


def test_existing_directory_is_refused_unless_overwrite_and_stdin_works(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tokens"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"abc" * 100)))
    assert dtrain(["prepare-tokens", "-", "-o", str(out), "--val-fraction", "0"]) == 0
    assert read_split(out, "train")[1].tolist() == list(b"abc" * 100)
    with pytest.raises(SystemExit) as info:
        dtrain(["prepare-tokens", "-", "-o", str(out)])
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    (tmp_path / "t.txt").write_bytes(b"xyz" * 10)
    assert dtrain(["prepare-tokens", str(tmp_path / "t.txt"), "-o", str(out), "--overwrite",
                   "--val-fraction", "0"]) == 0
    assert read_split(out, "train")[1].tolist() == list(b"xyz" * 10)
    with pytest.raises(SystemExit) as info:
        dtrain(["prepare-tokens", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")])
    assert info.value.code == 2 and "missing.txt" in capsys.readouterr().err


def prepare_failing(tmp_path, monkeypatch, capsys, fail):
    """Run prepare-tokens into tmp_path/tokens with shards of 100 tokens, `fail(path)` deciding
    which file opened for writing fails and how; returns (exit code, stderr, files left in DIR)."""
    (tmp_path / "in.txt").write_bytes(b"0123456789" * 100)  # ten shards
    out = tmp_path / "tokens"
    real_open = open

    def open_failing(path, mode="r", *args, **kwargs):
        if "w" in mode and (error := fail(str(path))) is not None:
            if error.errno == errno.ENOSPC:  # a full disk: the file is created, then writing fails
                real_open(path, mode).close()
            raise error
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(prepare_tokens, "open", open_failing, raising=False)
    with pytest.raises(SystemExit) as info:
        dtrain(["prepare-tokens", str(tmp_path / "in.txt"), "-o", str(out), "--val-fraction", "0",
                "--shard-tokens", "100"])
    return info.value.code, capsys.readouterr().err.strip().splitlines(), sorted(p.name for p in out.iterdir())


def test_a_full_disk_while_writing_shards_is_one_line_and_removes_every_shard(tmp_path, monkeypatch, capsys):
    full = OSError(errno.ENOSPC, "No space left on device")
    code, err, left = prepare_failing(tmp_path, monkeypatch, capsys,
                                      lambda path: full if path.endswith("train-000003.bin.tmp") else None)
    assert code == 2 and left == []  # three finished shards and the partial fourth are gone
    assert err[-1] == (f"dtrain: error: cannot write {tmp_path}/tokens/train-000003.bin.tmp: no space left on "
                       "device; removed the shards written so far")


def test_a_read_only_file_system_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    def read_only(path):
        return OSError(errno.EROFS, "Read-only file system", path)

    code, err, left = prepare_failing(tmp_path, monkeypatch, capsys, read_only)
    assert code == 2 and left == []
    assert err[-1] == (f"dtrain: error: cannot write {tmp_path}/tokens/train-000000.bin.tmp: read-only file "
                       "system; removed the shards written so far")


def test_a_full_disk_while_writing_meta_leaves_no_shard_and_no_meta(tmp_path, monkeypatch, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real_open = os.open

    def open_full(path, flags, *args, **kwargs):
        if str(path).endswith("meta.json.tmp"):
            real_open(path, flags, *args, **kwargs)
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_full)
    code, err, left = prepare_failing(tmp_path, monkeypatch, capsys, lambda path: None)
    assert code == 2 and left == []
    assert err[-1] == (f"dtrain: error: cannot write the token metadata {tmp_path}/tokens/meta.json: no space "
                       "left on device")


def test_an_output_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "in.txt").write_bytes(b"abc")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as info:
        dtrain(["prepare-tokens", str(tmp_path / "in.txt"), "-o", str(tmp_path / "file" / "tokens")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1] == (f"dtrain: error: -o {str(tmp_path / 'file' / 'tokens')!r} cannot be "
                                                f"created ({str(tmp_path / 'file')!r} is a file, not a directory)")
    with pytest.raises(SystemExit):  # and the reverse: a directory given as an input file
        dtrain(["prepare-tokens", str(tmp_path), "-o", str(tmp_path / "out")])
    assert capsys.readouterr().err.strip().endswith(f"input {str(tmp_path)!r} is a directory, not a file")
