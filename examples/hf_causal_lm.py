"""Train a Hugging Face `transformers` causal LM on the `lm` task's token files.

    dtrain launch --nproc-per-node 2 examples/hf_causal_lm.yaml       # the bundled text, bytes
    dtrain prepare-tokens corpus.txt -o tokens
    dtrain launch --nproc-per-node 2 examples/hf_causal_lm.yaml --task_args.data=tokens

Without `data` or `train` it trains on the text the package ships (the charlm task's 1.2 MB of
public-domain English, one token per byte), written once per process to a temporary file.

The model comes from a config, built locally (AutoConfig.for_model + from_config, nothing is
downloaded): `task_args.model_type` (llama, gpt2, qwen2, ...) and `task_args.config.KEY=VALUE`
for its fields; or from a local model directory, `task_args.model=PATH` (config and weights,
read with local_files_only). The data options are the lm task's: `data=DIR`, or `train=GLOB`
[`val=GLOB`, `dtype`, `vocab_size`], `val_fraction`, and `seq_len` (default 256). The model's
decoder layers are its shard units (FSDP, activation checkpointing).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distributed_train.errors import UsageError
from distributed_train.tasks.lm import DATA_OPTIONS, TokenData

MODEL_OPTIONS = ("model", "model_type", "config", "seq_len")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError("examples/hf_causal_lm.py needs transformers: pip install transformers "
                         "(or pip install 'distributed_train[lm]')") from None
    return transformers


def bundled_text_as_bytes() -> str:
    """The package's bundled text as a .npy file of byte tokens (uint16) in the temporary directory,
    named after its content's hash and written atomically: every rank and every later run reuse the
    one file (never a partial one), and nothing is left per run (workers end with os._exit, which
    skips atexit)."""
    from distributed_train.tasks.charlm import TEXT_PATH

    packed = TEXT_PATH.read_bytes()
    path = os.path.join(tempfile.gettempdir(), f"dtrain-bundled-text-{hashlib.sha256(packed).hexdigest()[:16]}.npy")
    if not os.path.isfile(path):
        fd, partial = tempfile.mkstemp(prefix=".dtrain-bundled-text-", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.frombuffer(gzip.decompress(packed), dtype=np.uint8).astype(np.uint16))
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return path


class HFCausalLMTask:
    """Next-token prediction with any `AutoModelForCausalLM` over memory-mapped token windows."""

    config_defaults = {"train": {"batch_size": 16, "lr": 3e-4, "weight_decay": 0.1, "grad_clip": 1.0,
                                 "max_steps": 1000}}

    def __init__(self, config: Any = None):
        task_args = dict(getattr(config, "task_args", None) or {})
        unknown = sorted(set(task_args) - set(MODEL_OPTIONS) - set(DATA_OPTIONS))
        if unknown:
            raise UsageError(f"unknown option task_args.{unknown[0]}; this task takes "
                             f"{', '.join(MODEL_OPTIONS + DATA_OPTIONS)}")
        if bool(task_args.get("model")) == bool(task_args.get("model_type")):
            raise UsageError("set exactly one of task_args.model_type (a config built here, e.g. llama) "
                             "and task_args.model (a local model directory)")
        self.model_dir, self.model_type = task_args.get("model"), task_args.get("model_type")
        self.config_fields = dict(task_args.get("config") or {})
        self.seq_len = self.tokens_per_sample = int(task_args.get("seq_len", 256))
        data_args = {k: v for k, v in task_args.items() if k in DATA_OPTIONS}
        if not data_args.get("data") and not data_args.get("train"):
            data_args.update(train=bundled_text_as_bytes(), dtype="uint16", vocab_size=256)
        self.data = TokenData(data_args)
        self._train, self._eval = self.data.windows(self.seq_len)
        self.model_config = self._model_config()
        if self.model_config.vocab_size < self.data.vocab_size:
            raise UsageError(f"the model's vocab_size ({self.model_config.vocab_size}) is below the "
                             f"data's ({self.data.vocab_size}); set task_args.config.vocab_size")

    def _model_config(self) -> Any:
        transformers = _transformers()
        if self.model_dir:
            return transformers.AutoConfig.from_pretrained(self.model_dir, local_files_only=True,
                                                           **self.config_fields)
        fields = {"vocab_size": -(-self.data.vocab_size // 64) * 64,
                  "max_position_embeddings": self.seq_len, **self.config_fields}
        try:
            return transformers.AutoConfig.for_model(self.model_type, **fields)
        except ValueError as exc:
            raise UsageError(f"task_args.model_type={self.model_type!r}: {exc}".splitlines()[0]) from None

    def train_dataset(self) -> Any:
        return self._train

    def eval_dataset(self) -> Any:
        return self._eval

    def model(self) -> nn.Module:
        auto = _transformers().AutoModelForCausalLM
        if self.model_dir:
            return auto.from_pretrained(self.model_dir, config=self.model_config, local_files_only=True)
        model = auto.from_config(self.model_config)
        model.config.use_cache = False  # training: no key/value cache
        return model

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers: the longest ModuleList (model.layers, transformer.h, ...)."""
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        return list(max(lists, key=len)) if lists else [model]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over every token; the windows already hold the shifted targets."""
        x, y = batch
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
