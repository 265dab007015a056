"""A task whose `__getitem__` draws from torch, Python `random` and NumPy (a random augmentation)."""

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

SAMPLES, FEATURES = 96, 6


class NoisySamples(Dataset):
    """Sample i = (features + noise from all three generators, target, i)."""

    def __init__(self, n: int = SAMPLES, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, FEATURES, generator=generator)
        self.targets = self.features @ torch.randn(FEATURES, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int):
        noise = 0.1 * torch.randn(FEATURES) + random.gauss(0.0, 0.1) \
            + torch.from_numpy(np.random.normal(0.0, 0.1, FEATURES)).float()
        return self.features[index] + noise, self.targets[index], index


class AugmentTask:
    """Linear regression on noisy features: the noise is the randomness a resume must repeat."""

    def train_dataset(self) -> NoisySamples:
        return NoisySamples()

    def eval_dataset(self) -> NoisySamples:
        return NoisySamples(30, seed=1)

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y, _ = batch
        return F.mse_loss(model(x), y)


KILL_AT_STEP: int | None = None  # set in a rank by a test: SIGKILL this process in that training step
_train_steps = 0


class KilledAugmentTask(AugmentTask):
    """AugmentTask whose process kills itself with SIGKILL in training step KILL_AT_STEP: a real
    kill mid-run (no Python cleanup, no checkpoint, DataLoader workers orphaned)."""

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        global _train_steps
        if model.training:  # the pre-training check of loss() runs in eval mode
            _train_steps += 1
            if _train_steps == KILL_AT_STEP:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
        return super().loss(model, batch)
