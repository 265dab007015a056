"""A task whose loss draws from torch, Python and NumPy randomness, and that can SIGTERM itself.

The environment variable NOISY_STOP_AT_STEP=K sends SIGTERM to this process inside step K's loss (every rank at the
same step): the run stops there mid-schedule, committing a checkpoint, as a preemption would.
"""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distributed_train.distributed import diagnose
from tests.tasks.stop_signal import send
from tests.tasks.toy import Regression


class NoisyRegression(Regression):
    """Regression with dropout and loss noise from all three generators a task may use."""

    def __init__(self, config=None):
        super().__init__(config)
        self.stop_at_step = int(os.environ.get("NOISY_STOP_AT_STEP", 0))
        self.sent = False

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        # The step being trained, as the trainer records it (loss() also runs outside training steps).
        if not self.sent and model.training and diagnose.position.step == self.stop_at_step:
            self.sent = True
            send(os.getpid(), signal.SIGTERM)  # handled at the end of this step
        x, y = batch[0], batch[1]
        # Python and NumPy streams are not reseeded per step: only the checkpoint restores them.
        scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return scale * F.mse_loss(model(x).squeeze(-1), y)
