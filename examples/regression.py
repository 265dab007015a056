"""A complete task: noisy linear regression on synthetic data. Copy it and change the three parts.

    dtrain launch examples/regression.py:RegressionTask        # or: --task=examples/regression.py:RegressionTask
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class RegressionTask:
    # Optional: defaults for this task (a config file and the command line still win).
    config_defaults = {"train": {"batch_size": 32, "lr": 0.05, "epochs": 5}}

    def __init__(self, config=None):
        # The resolved config is passed in when the constructor takes an argument;
        # free-form options live in config.task_args (e.g. --task_args.features=16).
        args = getattr(config, "task_args", {}) or {}
        self.features = int(args.get("features", 8))
        generator = torch.Generator().manual_seed(0)  # the data must be identical on every rank
        self.x = torch.randn(1024, self.features, generator=generator)
        true_w = torch.randn(self.features, 1, generator=generator)
        self.y = self.x @ true_w + 0.1 * torch.randn(1024, 1, generator=generator)

    def train_dataset(self):
        return TensorDataset(self.x[:896], self.y[:896])

    def eval_dataset(self):
        return TensorDataset(self.x[896:], self.y[896:])

    def model(self):
        return nn.Linear(self.features, 1)

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)  # the MEAN over the batch

    def metrics(self, model, batch):
        # (sum, count) pairs: summed over all ranks, then divided -> exact over the eval set.
        x, y = batch
        return {"mse": (F.mse_loss(model(x), y, reduction="sum"), y.numel())}
