"""`dtrain prepare-tokens`: byte and Hugging Face tokenizers, streaming split, shards, refusals."""

import io
import json
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
