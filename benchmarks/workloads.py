"""The benchmark workloads, shared by the plain torchrun+DDP loop and by `dtrain`.

Each workload names a task (dataset, model, loss), the per-rank batch, the learning rate and the
number of steps; both sides build the data and the model from the same task with the same seed,
so they run the same math and must end at the same loss.
"""

from __future__ import annotations

import gzip
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # so `python benchmarks/...` works from a source checkout
    sys.path.insert(0, REPO)


@dataclass(frozen=True)
class Workload:
    """One benchmark row: a task, its per-rank batch and how long to train."""

    name: str
    task: str  # what `dtrain --task=` takes
    batch_per_rank: int
    lr: float
    steps: int
    log_every: int
    task_args: dict = field(default_factory=dict)
    plain_script: str = "plain_ddp.py"  # the plain loop it is compared with


# The lm workload's corpus: the KJV text as byte tokens (uint16, nanoGPT's flat layout), written
# once under the temp folder; both sides memory-map the same file.
LM_TOKENS = os.path.join(tempfile.gettempdir(), "dtrain-bench-lm", "kjv-bytes-uint16.bin")


def ensure_lm_tokens(path: str = LM_TOKENS) -> str:
    """Write the lm workload's token file if it is missing (atomically: both ranks may ask)."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = gzip.open(os.path.join(REPO, "distributed_train", "tasks", "data", "kjv_pentateuch.txt.gz")).read()
        tmp = f"{path}.{os.getpid()}.tmp"
        np.frombuffer(text, dtype=np.uint8).astype(np.uint16).tofile(tmp)
        os.replace(tmp, path)
    return path


WORKLOADS = {
    "digits": Workload("digits", "digits", batch_per_rank=32, lr=2e-3, steps=600, log_every=50),
    "charlm": Workload("charlm", "charlm", batch_per_rank=16, lr=1e-3, steps=40, log_every=8,
                       task_args={"preset": "tiny"}),
    "cnn": Workload("cnn", os.path.join(HERE, "workloads.py") + ":CNNTask", batch_per_rank=64,
                    lr=1e-3, steps=60, log_every=10),
    "lm": Workload("lm", "lm", batch_per_rank=16, lr=1e-3, steps=40, log_every=8,
                   task_args={"train": LM_TOKENS, "dtype": "uint16", "vocab_size": 256, "preset": "tiny",
                              "seq_len": 128},
                   plain_script="lm_plain.py"),
}
SEED = 0


class _TaskConfig:
    """The one attribute tasks read from the config: `task_args`."""

    def __init__(self, task_args: dict):
        self.task_args = dict(task_args)


def build_task(workload: Workload):
    """The workload's task object, built the way `dtrain` builds it (class called with the config)."""
    if workload.name == "digits":
        from distributed_train.tasks.digits import DigitsTask

        return DigitsTask(_TaskConfig(workload.task_args))
    if workload.name == "lm":
        from distributed_train.tasks.lm import LMTask

        ensure_lm_tokens(workload.task_args["train"])
        return LMTask(_TaskConfig(workload.task_args))
    if workload.name == "charlm":
        from distributed_train.tasks.charlm import CharLMTask

        return CharLMTask(_TaskConfig(workload.task_args))
    return CNNTask(_TaskConfig(workload.task_args))


# ---------------------------------------------------------------------------------------------
# The small CNN workload: seeded synthetic 3x32x32 images whose labels a fixed random "teacher"
# assigns, so the loss really falls and both sides can be compared on it.

TRAIN_IMAGES, EVAL_IMAGES, CLASSES = 4096, 512, 10


def synthetic_images(n: int, seed: int) -> TensorDataset:
    """`n` seeded 3x32x32 images and their teacher labels (same on every rank and process)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    teacher = torch.randn(3 * 4 * 4, CLASSES, generator=torch.Generator().manual_seed(99))
    labels = (F.avg_pool2d(images, 8).flatten(1) @ teacher).argmax(1)
    return TensorDataset(images, labels)


class CNNTask:
    """Classify synthetic 3x32x32 images with a 3-conv-layer CNN."""

    def __init__(self, config=None):
        args = dict(getattr(config, "task_args", None) or {})
        if args:
            raise ValueError(f"unknown task_args.{next(iter(args))} (the cnn benchmark takes none)")

    def train_dataset(self) -> TensorDataset:
        return synthetic_images(TRAIN_IMAGES, seed=1)

    def eval_dataset(self) -> TensorDataset:
        return synthetic_images(EVAL_IMAGES, seed=2)

    def model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(128, CLASSES),
        )

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)
