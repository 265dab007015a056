"""Built-in `digits` task: an MLP classifier on the 8x8 handwritten digits scikit-learn bundles.

The 1,797 images ship with the package (data/digits.csv.gz, 57 KB), so the default job needs
no download. A fixed split (independent of `seed`) holds out 297 images for evaluation.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

DATA_FILE = Path(__file__).parent / "data" / "digits.csv.gz"
EVAL_SIZE = 297


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images scaled to [0, 1] as float32 [1797, 64], labels int64 [1797])."""
    with gzip.open(DATA_FILE, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return torch.from_numpy(table[:, :64] / 16.0), torch.from_numpy(table[:, 64].astype(np.int64))


def _split() -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(load_digits()[1]), generator=torch.Generator().manual_seed(1234))
    return order[EVAL_SIZE:], order[:EVAL_SIZE]


class DigitsTask:
    """Classify 8x8 digit images with a 64-256-256-10 MLP; eval reports accuracy and loss."""

    # Sensible defaults for this task; a config file or the command line overrides them.
    config_defaults = {"train": {"epochs": 20, "batch_size": 64, "lr": 2e-3}}

    def __init__(self, config=None):
        args = dict(getattr(config, "task_args", None) or {})
        self.hidden = args.pop("hidden", 256)
        if args:
            raise ValueError(f"unknown task_args.{next(iter(args))} (digits takes task_args.hidden)")
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"task_args.hidden must be a positive integer, got {self.hidden!r}")

    def _subset(self, index: torch.Tensor) -> TensorDataset:
        images, labels = load_digits()
        return TensorDataset(images[index], labels[index])

    def train_dataset(self) -> TensorDataset:
        return self._subset(_split()[0])

    def eval_dataset(self) -> TensorDataset:
        return self._subset(_split()[1])

    def model(self) -> nn.Module:
        h = self.hidden
        return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def metrics(self, model: nn.Module, batch) -> dict:
        images, labels = batch
        logits = model(images)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 as it is
        n = labels.numel()
        return {
            "loss": (F.cross_entropy(logits, labels, reduction="sum"), n),
            "accuracy": ((logits.argmax(-1) == labels).sum(), n),
        }

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample: 6 x parameters (forward 2, backward 4)."""
        h = self.hidden
        return 6.0 * (64 * h + h * h + h * 10)
