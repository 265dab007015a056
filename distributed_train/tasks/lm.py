"""lm: a GPT-style causal language model over memory-mapped token files.

Data (task_args): `data=DIR` (written by `dtrain prepare-tokens`, with meta.json), or
`train=GLOB` [+ `val=GLOB`] flat token files (nanoGPT's `.bin`) or `.npy`, with `dtype`
(uint16 | uint32) and `vocab_size`. Without a validation split the last `val_fraction` of the
windows is held out. Model (task_args): `preset` (tiny | gpt2-small | gpt2-medium | 1b) and
`n_layer`, `n_head`, `d_model`, `seq_len`, `dropout` on top; the vocabulary is padded to a
multiple of 64 and the LM head is tied to the token embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distributed_train.errors import UsageError
from distributed_train.tasks import tokens
from distributed_train.tasks.charlm import (
    GPT,
    VOCAB_MULTIPLE,
    token_loss,
    token_metrics,
)

PRESETS = {
    "tiny": {"n_layer": 4, "n_head": 4, "d_model": 128, "seq_len": 256},
    "gpt2-small": {"n_layer": 12, "n_head": 12, "d_model": 768, "seq_len": 1024},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "d_model": 1024, "seq_len": 1024},
    "1b": {"n_layer": 20, "n_head": 16, "d_model": 2048, "seq_len": 2048},
}
MODEL_OPTIONS = ("preset", "n_layer", "n_head", "d_model", "seq_len", "dropout")
DATA_OPTIONS = ("data", "train", "val", "dtype", "vocab_size", "val_fraction")
RAW_DEFAULTS = {"dtype": "uint16", "vocab_size": 50257}  # nanoGPT's GPT-2 token files
VAL_FRACTION = 0.01


def _int_option(args: dict, name: str, minimum: int = 1) -> int:
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"task_args.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def model_options(task_args: dict) -> dict[str, Any]:
    """The preset's shape with explicit options on top, checked; UsageError names the option."""
    preset = task_args.get("preset", "tiny")
    if preset not in PRESETS:
        raise UsageError(f"task_args.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    args = {**PRESETS[preset], "dropout": 0.0,
            **{k: v for k, v in task_args.items() if k in MODEL_OPTIONS and k != "preset"}}
    for name in ("n_layer", "n_head", "d_model", "seq_len"):
        _int_option(args, name)
    if args["d_model"] % args["n_head"]:
        raise UsageError(f"task_args.d_model ({args['d_model']}) must be a multiple of "
                         f"task_args.n_head ({args['n_head']})")
    dropout = args["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UsageError(f"task_args.dropout must be a number in [0, 1), got {dropout!r}")
    args["dropout"] = float(dropout)
    return args


class TokenData:
    """The train and validation shards, dtype and vocabulary size that task_args describe."""

    def __init__(self, task_args: dict):
        if bool(task_args.get("data")) == bool(task_args.get("train")):
            raise UsageError("the lm task needs task_args.data=DIR (from `dtrain prepare-tokens`) "
                             "or task_args.train=GLOB (flat token files), exactly one of them")
        if task_args.get("data"):
            self._from_directory(task_args)
        else:
            self._from_files(task_args)
        if not self.train:
            raise UsageError("the training split holds no token files")
        self.val_fraction = task_args.get("val_fraction", VAL_FRACTION)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0 < self.val_fraction < 1:
            raise UsageError(f"task_args.val_fraction must be a number in (0, 1), got {self.val_fraction!r}")

    def windows(self, seq_len: int) -> tuple[tokens.TokenWindows, tokens.TokenWindows]:
        """Train and validation windows; without a validation split, the last `val_fraction` of
        the training windows (at least one) is held out."""
        train = tokens.TokenWindows(self.train, seq_len, self.vocab_size)
        if self.val:
            evaluation = tokens.TokenWindows(self.val, seq_len, self.vocab_size)
        else:
            held_out = max(1, round(len(train) * self.val_fraction))
            evaluation = tokens.TokenWindows(self.train, seq_len, self.vocab_size, first=len(train) - held_out)
            train = tokens.TokenWindows(self.train, seq_len, self.vocab_size, count=len(train) - held_out)
        if len(train) == 0 or len(evaluation) == 0:
            where = "training" if len(train) == 0 else "validation"
            raise UsageError(f"the {where} tokens hold no window of task_args.seq_len + 1 = "
                             f"{seq_len + 1} tokens; lower task_args.seq_len or add data")
        return train, evaluation

    def _from_directory(self, task_args: dict) -> None:
        directory = str(task_args["data"])
        if task_args.get("val"):
            raise UsageError("task_args.val goes with task_args.train; task_args.data has its own split")
        meta = tokens.read_meta(directory)
        for name in ("dtype", "vocab_size"):
            if name in task_args and task_args[name] != meta[name]:
                raise UsageError(f"task_args.{name}={task_args[name]!r} but {directory}/meta.json "
                                 f"says {name}={meta[name]!r}; leave task_args.{name} out to use the file's")
        self.dtype_name, self.vocab_size = meta["dtype"], meta["vocab_size"]
        self.train = tokens.shards_from_meta(directory, meta, "train")
        self.val = tokens.shards_from_meta(directory, meta, "val")

    def _from_files(self, task_args: dict) -> None:
        self.dtype_name = task_args.get("dtype", RAW_DEFAULTS["dtype"])
        if self.dtype_name not in tokens.DTYPES:
            raise UsageError(f"task_args.dtype must be one of {', '.join(tokens.DTYPES)}, got {self.dtype_name!r}")
        self.vocab_size = _int_option({"vocab_size": task_args.get("vocab_size", RAW_DEFAULTS["vocab_size"])},
                                      "vocab_size")
        dtype = tokens.DTYPES[self.dtype_name]
        self.train = tokens.find_shards(task_args["train"], dtype, "task_args.train")
        self.val = tokens.find_shards(task_args["val"], dtype, "task_args.val") if task_args.get("val") else []
        if self.vocab_size > 1 << (8 * dtype.itemsize):
            raise UsageError(f"task_args.vocab_size={self.vocab_size} does not fit task_args.dtype={self.dtype_name}")


class LMTask:
    """Next-token prediction with a GPT over token files; the built-in `lm` task."""

    # Evaluation is bounded, like nanoGPT's eval_iters: a fixed subset of the held-out windows (the
    # whole split of a large corpus took minutes); --eval.max_samples=null evaluates all of it.
    config_defaults = {"train": {"batch_size": 32, "lr": 6e-4, "weight_decay": 0.1, "grad_clip": 1.0,
                                 "max_steps": 1000},
                       "eval": {"max_samples": 2048}}

    def __init__(self, config: Any = None):
        task_args = dict(getattr(config, "task_args", None) or {})
        unknown = sorted(set(task_args) - set(MODEL_OPTIONS) - set(DATA_OPTIONS))
        if unknown:
            raise UsageError(f"unknown option task_args.{unknown[0]}; the lm task takes "
                             f"{', '.join(MODEL_OPTIONS + DATA_OPTIONS)}")
        self.args = model_options(task_args)
        self.data = TokenData(task_args)
        self.seq_len = self.tokens_per_sample = self.args["seq_len"]
        self.vocab_size = -(-self.data.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        self._train, self._eval = self.data.windows(self.seq_len)

    def train_dataset(self) -> tokens.TokenWindows:
        return self._train

    def eval_dataset(self) -> tokens.TokenWindows:
        return self._eval

    def model(self) -> GPT:
        a = self.args
        return GPT(self.vocab_size, a["seq_len"], a["n_layer"], a["n_head"], a["d_model"], a["dropout"])

    def shard_units(self, model: GPT) -> list[nn.Module]:
        """The transformer blocks: the units FSDP shards and activation checkpointing recomputes."""
        return list(model.blocks)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return token_loss(model, batch)

    def metrics(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, tuple]:
        return token_metrics(model, batch, self.vocab_size, "bits_per_token")

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) per window: (6N + 12 L d T) per token, times T."""
        a, T = self.args, self.seq_len
        d, L = a["d_model"], a["n_layer"]
        n_matmul = L * (12 * d * d + 13 * d) + 2 * d + d * self.vocab_size
        return float(T * (6 * n_matmul + 12 * L * d * T))
