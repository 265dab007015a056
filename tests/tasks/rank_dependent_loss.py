"""A task whose loss is each sample's own value: ranks see different samples, so their losses differ.

With `task_args.record_dir`, every training loss is appended to record_dir/rank<R>.txt, so a test
can average the ranks' losses itself and compare with what metrics.jsonl says.
"""

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset


class RankLoss:
    def __init__(self, config=None):
        self.record_dir = (getattr(config, "task_args", None) or {}).get("record_dir")

    def train_dataset(self):
        return TensorDataset(torch.arange(32, dtype=torch.float32).unsqueeze(1) ** 2 / 100)

    def model(self):
        return nn.Linear(1, 1)

    def loss(self, model, batch):
        (x,) = batch
        # The model term is tiny and keeps a gradient; the value is dominated by the data.
        loss = x.mean() + 1e-6 * model(x).mean()
        if self.record_dir and torch.is_grad_enabled():
            rank = os.environ.get("RANK", "0")
            with open(Path(self.record_dir) / f"rank{rank}.txt", "a") as f:
                f.write(f"{loss.item()!r}\n")
        return loss
