"""Small deterministic tasks for the tests, plus broken ones for the error tests.

Load them by file (`--task=tests/tasks/toy.py:Regression`) so spawned ranks and subprocesses
import them without any sys.path setup. Everything is seeded: the same data on every rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

N_TRAIN = 96
N_EVAL = 50  # not divisible by 3 or 4: exact evaluation must not pad or drop samples
WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0])


def regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, 4], y [n]) with y = x.w + small noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return x, x @ WEIGHTS + 0.1 * torch.randn(n, generator=generator)


def regression_metrics(model: nn.Module, batch) -> dict:
    """mse and sign accuracy of the model, and two model-free checks of which samples were seen."""
    x, y, ids = batch
    pred = model(x).squeeze(-1)
    n = len(y)
    return {
        "mse": (((pred - y) ** 2).sum(), n),
        "sign_accuracy": (((pred > 0) == (y > 0)).sum(), n),
        "id_mean": (ids.sum(), n),  # (N-1)/2 exactly when every id is counted once
        "first_ten": ((ids < 10).sum(), n),  # 10/N exactly
    }


class Regression:
    """Linear regression with a 4-8-1 tanh MLP; eval samples carry their index for exactness checks."""

    def __init__(self, config=None):
        args = dict(getattr(config, "task_args", None) or {})
        self.n_eval = args.get("n_eval", N_EVAL)

    def train_dataset(self) -> Dataset:
        return TensorDataset(*regression_data(N_TRAIN, seed=0))

    def eval_dataset(self) -> Dataset:
        x, y = regression_data(self.n_eval, seed=1)
        return TensorDataset(x, y, torch.arange(self.n_eval))

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return F.mse_loss(model(x).squeeze(-1), y)

    def metrics(self, model: nn.Module, batch) -> dict:
        return regression_metrics(model, batch)


class BatchNormRegression(Regression):
    """Regression through a BatchNorm layer (running-stat buffers); remembers its last model."""

    last_model: nn.Module | None = None

    def model(self) -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        type(self).last_model = model
        return model


class PretrainedOnRankZero(BatchNormRegression):
    """Loads its "pretrained" weights and BatchNorm statistics on rank 0 only, as DDP examples do
    to read a file once: the other ranks keep a random start that rank 0's must replace."""

    def model(self) -> nn.Module:
        model = super().model()
        if os.environ.get("RANK", "0") == "0":
            generator = torch.Generator().manual_seed(123)
            with torch.no_grad():
                for tensor in [*model.parameters(), model[1].running_mean, model[1].running_var]:
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        return model


class NoArgs(Regression):
    """A task class whose constructor takes no config."""

    def __init__(self):
        super().__init__()


def make_regression():
    """A zero-argument factory."""
    return Regression()


def make_with_config(config):
    """A factory that takes the resolved config."""
    task = Regression(config)
    task.seen_config = config
    return task


regression_instance = Regression()


class SetVocabulary:
    """Next-character prediction over a vocabulary in a set's order (`list(set(text))`), as many
    a user's task builds it: the same on every rank only where every process hashes strings alike.
    Each rank writes its vocabulary to `task_args.out`/vocabulary-RANK.txt."""

    TEXT = "the quick brown fox jumps over the lazy dog, then sleeps. " * 8

    def __init__(self, config):
        self.out = Path(config.task_args["out"])

    def train_dataset(self):
        vocabulary = list(set(self.TEXT))
        (self.out / f"vocabulary-{os.environ.get('RANK', '0')}.txt").write_text("".join(vocabulary))
        ids = torch.tensor([vocabulary.index(c) for c in self.TEXT])
        return TensorDataset(ids[:-1].unfold(0, 8, 1), ids[1:].unfold(0, 8, 1))

    def model(self):
        return nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 32))

    def loss(self, model, batch):
        inputs, targets = batch
        return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


# ---- broken tasks: each must fail with a UsageError naming the method --------------------------

class NoLoss:
    def train_dataset(self):
        return TensorDataset(*regression_data(8, seed=0))

    def model(self):
        return nn.Linear(4, 1)


class NoModel:
    def train_dataset(self):
        return TensorDataset(*regression_data(8, seed=0))

    def loss(self, model, batch):
        return model(batch[0]).mean()


class NoTrainDataset:
    def model(self):
        return nn.Linear(4, 1)

    def loss(self, model, batch):
        return model(batch[0]).mean()


class VectorLoss(Regression):
    """loss() forgets to reduce: one value per sample."""

    def loss(self, model, batch):
        return (model(batch[0]).squeeze(-1) - batch[1]) ** 2


class EmptyDataset(Regression):
    def train_dataset(self):
        return TensorDataset(torch.zeros(0, 4), torch.zeros(0))


class ModelNotModule(Regression):
    def model(self):
        return lambda x: x


class FailingConstructor:
    def __init__(self):
        raise RuntimeError("cannot find the data")


class OwnSchedule(Regression):
    """nanoGPT's shape: `optimizer(model, config)` groups parameters by name (decay for weights,
    none for biases), and a `scheduler`: torch's StepLR (`task_args.schedule=step`) or a function
    of the step giving the learning rate (`function`, like nanoGPT's get_lr)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.schedule = dict(getattr(config, "task_args", None) or {}).get("schedule", "step")

    def optimizer(self, model, config):
        assert isinstance(model, nn.Module), f"optimizer() got {type(model).__name__}, not the model"
        weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
        biases = [p for name, p in model.named_parameters() if not name.endswith("weight")]
        return torch.optim.SGD([{"params": weights, "weight_decay": 0.01}, {"params": biases, "weight_decay": 0.0}],
                               lr=0.05, momentum=0.9)

    def scheduler(self, optimizer, config):
        if self.schedule == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        if self.schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        broken = {  # functions that go wrong at step 3 (bad-input tests)
            "raises": lambda step: {}["warmup_iters"],
            "nan": lambda step: float("nan"),
            "negative": lambda step: -0.01,
            "text": lambda step: "0.05",
        }.get(self.schedule)
        if broken:
            return lambda step: 0.05 if step < 3 else broken(step)
        if self.schedule == "tensor":
            return lambda step: torch.tensor(0.05 * 0.8 ** step, dtype=torch.float64)
        return lambda step: 0.05 * 0.8 ** step
