"""Token files on disk as one dataset: memory-mapped shards, windows of seq_len + 1 tokens.

Shards are flat little-endian token arrays without a header (nanoGPT's `.bin` layout), or `.npy`
files; `dtrain prepare-tokens` writes the former plus a `meta.json`. Nothing is read up front:
each process maps a shard when it first reads from it, so start-up time and resident memory do
not grow with the corpus, and DataLoader workers share the page cache.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from distributed_train.errors import UsageError
from distributed_train.files import path_problem

META_NAME = "meta.json"
META_FORMAT = "dtrain-tokens"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class TokenOutOfRange(UsageError):
    """A token id at or above the vocabulary size. It stays one line also when a DataLoader
    worker re-raises it (torch builds the exception again from the worker's whole traceback)."""

    def __init__(self, message: str):
        last = message.strip().splitlines()[-1] if message.strip() else message
        name = f"{type(self).__module__}.{type(self).__qualname__}: "
        super().__init__(last[len(name):] if "\n" in message and last.startswith(name) else message)


@dataclass(frozen=True)
class Shard:
    """One token file: its path, element type and number of tokens."""

    path: str
    dtype: np.dtype
    tokens: int

    def open(self) -> np.ndarray:
        """The tokens as a read-only memory map (no data read yet)."""
        if self.path.endswith(".npy"):
            return np.load(self.path, mmap_mode="r")
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))


def describe_shard(path: str, dtype: np.dtype) -> Shard:
    """A shard from its file size (flat files) or its header (`.npy`): no tokens are read."""
    if path.endswith(".npy"):
        array = np.load(path, mmap_mode="r")
        if array.ndim != 1 or array.dtype not in DTYPES.values():
            raise UsageError(f"token file {path!r} must hold a 1-D uint16 or uint32 array, "
                             f"got {array.dtype} of shape {array.shape}")
        return Shard(path, array.dtype, int(array.shape[0]))
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise UsageError(f"token file {path!r} has {size} bytes, not a multiple of {dtype.itemsize} "
                         f"({dtype.name}); check task_args.dtype")
    return Shard(path, dtype, size // dtype.itemsize)


def find_shards(patterns: str | list[str], dtype: np.dtype, key: str) -> list[Shard]:
    """The files that the glob pattern(s) match, sorted, as shards; none is a usage error."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths = sorted({p for pattern in patterns for p in glob.glob(os.path.expanduser(str(pattern)))
                    if os.path.isfile(p)})
    if not paths:
        raise UsageError(f"{key}={patterns if len(patterns) > 1 else patterns[0]!r} matches no file")
    return [describe_shard(p, dtype) for p in paths]


def read_meta(directory: str) -> dict:
    """DIR/meta.json as written by `dtrain prepare-tokens`, checked for the keys the task uses."""
    if problem := path_problem(directory, "directory"):
        raise UsageError(f"task_args.data={directory!r} {problem}: give the folder `dtrain prepare-tokens "
                         "INPUT -o DIR` wrote")
    path = Path(directory).expanduser() / META_NAME
    if not path.is_file():
        raise UsageError(f"task_args.data={directory!r} has no {META_NAME}: write the directory with "
                         "`dtrain prepare-tokens INPUT -o DIR`, or give task_args.train=GLOB")
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {META_FORMAT!r}")
        if meta["dtype"] not in DTYPES or not isinstance(meta["vocab_size"], int):
            raise ValueError(f"dtype {meta['dtype']!r} / vocab_size {meta['vocab_size']!r}")
        for split in meta["splits"].values():
            [(str(name), int(count)) for name, count in split["shards"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path} is not a prepare-tokens meta.json ({type(exc).__name__}: {exc})") from None
    return meta


def shards_from_meta(directory: str, meta: dict, split: str) -> list[Shard]:
    """The split's shards, each checked against the token count meta.json records for it."""
    dtype = DTYPES[meta["dtype"]]
    shards = []
    for name, expected in meta["splits"].get(split, {}).get("shards", []):
        path = str(Path(directory).expanduser() / name)
        if not os.path.isfile(path):
            raise UsageError(f"{path} is listed in {META_NAME} but missing")
        shard = describe_shard(path, dtype)
        if shard.tokens != expected:
            raise UsageError(f"{path} holds {shard.tokens} tokens but {META_NAME} says {expected}: "
                             "the directory changed after prepare-tokens wrote it")
        shards.append(shard)
    return shards


class TokenWindows(Dataset):
    """Non-overlapping windows of seq_len + 1 tokens over shards in one index space, from window
    `first` on; sample i = (x, y), y = x shifted by one token. Windows never cross shards."""

    def __init__(self, shards: list[Shard], seq_len: int, vocab_size: int, first: int = 0,
                 count: int | None = None):
        self.shards, self.seq_len, self.vocab_size = shards, seq_len, vocab_size
        per_shard = [s.tokens // (seq_len + 1) for s in shards]
        self.ends = np.cumsum(per_shard).tolist()  # window index where each shard's windows end
        total = self.ends[-1] if self.ends else 0
        self.first = first
        self.length = max(0, total - first if count is None else min(count, total - first))
        self._maps: dict[int, np.ndarray] = {}  # opened lazily in each process (not pickled)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return self.length

    def _window(self, index: int) -> tuple[int, int]:
        """(shard number, first token) of sample `index`."""
        if not 0 <= index < self.length:
            raise IndexError(f"window {index} out of range for {self.length} windows")
        window = self.first + index
        shard = bisect.bisect_right(self.ends, window)
        local = window - (self.ends[shard - 1] if shard else 0)
        return shard, local * (self.seq_len + 1)

    def _tokens(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = self.shards[shard].open()
        return self._maps[shard]

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked (B, seq_len) inputs and targets of these windows, token ids checked."""
        n = self.seq_len + 1
        rows = np.empty((len(indices), n), dtype=np.int64)
        places = [self._window(int(i)) for i in indices]
        for row, (shard, start) in zip(rows, places):
            row[:] = self._tokens(shard)[start:start + n]
        if rows.size and rows.max() >= self.vocab_size:
            row, column = np.argwhere(rows >= self.vocab_size)[0]
            shard, start = places[row]
            raise TokenOutOfRange(
                f"token id {rows[row, column]} at token offset {start + column} of "
                f"{self.shards[shard].path} is >= the vocabulary size {self.vocab_size}: set "
                "task_args.vocab_size (or task_args.dtype) to match how the file was tokenized")
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch([index])
        return x[0], y[0]


def token_count(shards: list[Shard]) -> int:
    return sum(s.tokens for s in shards)


def summary(shards: list[Shard]) -> dict[str, Any]:
    """A short description of a split for logs: files and tokens."""
    return {"files": len(shards), "tokens": token_count(shards)}
