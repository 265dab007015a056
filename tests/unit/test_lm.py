"""The lm task: memory-mapped token windows, data options, presets, exact eval subsets."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distributed_train.config import load_config
from distributed_train.errors import UsageError
from distributed_train.tasks import tokens
from distributed_train.tasks.lm import LMTask
from distributed_train.training.data import EvalBatchSampler, eval_subset


def task(**task_args) -> LMTask:
    return LMTask(SimpleNamespace(task_args=task_args))


def write(path, values, dtype=np.uint16):
    np.asarray(values, dtype=dtype).tofile(path)
    return str(path)


def test_windows_span_shards_in_one_index_space_and_never_cross_them(tmp_path):
    write(tmp_path / "a.bin", range(0, 23))  # 23 tokens: 4 windows of 5 (seq_len 4), 3 left over
    np.save(tmp_path / "b.npy", np.arange(100, 110, dtype=np.uint32))  # .npy: 2 windows
    shards = [tokens.describe_shard(str(tmp_path / "a.bin"), tokens.DTYPES["uint16"]),
              tokens.describe_shard(str(tmp_path / "b.npy"), tokens.DTYPES["uint16"])]
    windows = tokens.TokenWindows(shards, seq_len=4, vocab_size=200)
    assert len(windows) == 6
    x, y = windows.get_batch([0, 3, 4, 5])
    assert x.tolist() == [[0, 1, 2, 3], [15, 16, 17, 18], [100, 101, 102, 103], [105, 106, 107, 108]]
    assert torch.equal(y, x + 1) and x.dtype == torch.int64
    item = windows[4]
    assert torch.equal(item[0], x[2]) and torch.equal(item[1], y[2])
    held_out = tokens.TokenWindows(shards, seq_len=4, vocab_size=200, first=5)
    assert len(held_out) == 1 and held_out.get_batch([0])[0].tolist() == [[105, 106, 107, 108]]
    with pytest.raises(IndexError):
        windows.get_batch([6])


def test_token_out_of_range_names_file_and_offset_only_when_read(tmp_path):
    values = list(range(20))
    values[13] = 999  # in window 2 (tokens 10..14)
    path = write(tmp_path / "t.bin", values)
    lm = task(train=path, vocab_size=100, seq_len=4, val_fraction=0.25)  # nothing read yet: no error
    train = lm.train_dataset()
    assert train.get_batch([0, 1])[0].shape == (2, 4)
    with pytest.raises(tokens.TokenOutOfRange) as info:
        train.get_batch([1, 2])
    message = str(info.value)
    assert "token id 999 at token offset 13 of" in message and path in message and "\n" not in message
    # From a DataLoader worker: tests/distributed/test_data_workers.py (a worker forked from this
    # process, which pytest-xdist's threads share, can deadlock at start).


def test_raw_files_hold_out_a_fraction_and_padded_vocabulary(tmp_path):
    write(tmp_path / "s0.bin", np.arange(330) % 50)
    write(tmp_path / "s1.bin", np.arange(330) % 50)
    lm = task(train=str(tmp_path / "s*.bin"), vocab_size=50, seq_len=10, val_fraction=0.1)
    assert len(lm.train_dataset()) + len(lm.eval_dataset()) == 60
    assert len(lm.eval_dataset()) == 6
    model = lm.model()
    assert lm.vocab_size == 64 and model.tok_emb.weight.shape == (64, 128)
    assert model.head.weight is model.tok_emb.weight
    # The held-out windows are the last ones: window 54 of the whole index space onwards.
    whole = tokens.TokenWindows(lm.data.train, 10, 50)
    assert torch.equal(lm.eval_dataset().get_batch([0])[0], whole.get_batch([54])[0])
    assert torch.equal(lm.train_dataset().get_batch([53])[0], whole.get_batch([53])[0])
    batch = lm.train_dataset().get_batch([0, 1])
    loss = lm.loss(model, batch)
    assert loss.dim() == 0 and abs(loss.item() - np.log(64)) < 0.5
    metrics = lm.metrics(model, batch)
    assert metrics["loss"][1] == 20  # a Python count: filled in on the device by the evaluator


def test_data_directory_checks_meta_against_options_and_files(tmp_path):
    write(tmp_path / "train-000000.bin", np.arange(40) % 7)
    write(tmp_path / "val-000000.bin", np.arange(12) % 7)
    meta = {"format": tokens.META_FORMAT, "version": 1, "dtype": "uint16", "vocab_size": 7,
            "splits": {"train": {"tokens": 40, "shards": [["train-000000.bin", 40]]},
                       "val": {"tokens": 12, "shards": [["val-000000.bin", 12]]}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    lm = task(data=str(tmp_path), seq_len=3)
    assert (len(lm.train_dataset()), len(lm.eval_dataset())) == (10, 3)
    with pytest.raises(UsageError, match=r"task_args.vocab_size=9 but .*vocab_size=7"):
        task(data=str(tmp_path), vocab_size=9)
    with pytest.raises(UsageError, match=r"task_args.dtype='uint32' but .*dtype='uint16'"):
        task(data=str(tmp_path), dtype="uint32")
    write(tmp_path / "val-000000.bin", np.arange(10) % 7)
    with pytest.raises(UsageError, match="holds 10 tokens but meta.json says 12"):
        task(data=str(tmp_path), seq_len=3)
    with pytest.raises(UsageError, match="missing' does not exist: give the folder `dtrain prepare-tokens"):
        task(data=str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="val-000000.bin' is a file, not a directory: give the folder"):
        task(data=str(tmp_path / "val-000000.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no meta.json"):
        task(data=str(tmp_path / "empty"))


@pytest.mark.parametrize("task_args, message", [
    ({}, "task_args.data=DIR"),
    ({"data": "a", "train": "b"}, "exactly one"),
    ({"train": "/nonexistent/*.bin"}, "matches no file"),
    ({"train": "x", "colour": 1}, "unknown option task_args.colour"),
    ({"train": "x", "preset": "huge"}, "task_args.preset must be one of"),
    ({"train": "x", "d_model": 100, "n_head": 3}, "multiple of task_args.n_head"),
    ({"train": "x", "dtype": "int8"}, "task_args.dtype must be one of"),
])
def test_bad_options_name_the_option(task_args, message):
    with pytest.raises(UsageError, match=message):
        task(**task_args)


def test_presets_have_their_published_sizes(tmp_path):
    path = write(tmp_path / "t.bin", np.zeros(5000))
    expected = {"gpt2-small": 124e6, "gpt2-medium": 355e6, "1b": 1.1e9}
    for preset, size in expected.items():
        lm = task(train=path, preset=preset, seq_len=8)  # seq_len small: the file is tiny
        with torch.device("meta"):
            model = lm.model()
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - size) / size < 0.1, (preset, n)
        assert lm.shard_units(model) == list(model.blocks)


def test_eval_subset_is_fixed_exact_and_world_size_free():
    subset = eval_subset(1000, 37, seed=3)
    assert len(subset) == 37 == len(set(subset)) and list(subset) == sorted(subset)
    assert subset == eval_subset(1000, 37, seed=3) and subset != eval_subset(1000, 37, seed=4)
    assert eval_subset(10, 37, 0) == range(10) and eval_subset(10, None, 0) == range(10)
    for world_size in (1, 2, 3, 5):
        seen = [i for r in range(world_size)
                for batch in EvalBatchSampler(1000, r, world_size, 4, subset) for i in batch]
        assert seen == list(subset)
    assert load_config(None, ["--eval.max_samples=64"]).eval.max_samples == 64
    with pytest.raises(UsageError, match="eval.max_samples"):
        load_config(None, ["--eval.max_samples=0"])
