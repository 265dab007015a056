"""Tasks that give a `criterion` instead of `loss(model, batch)`, each next to the same task written
with `loss`, plus criterion mistakes for the error tests. Load them by file, like toy.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

WEIGHTS = torch.tensor([1.0, 2.0, 0.5])  # class weights: a criterion buffer


def classification_data(n: int = 48) -> TensorDataset:
    """(x [n, 4], label [n] in 0..2), seeded: the same on every rank."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


class WithLoss:
    """3-class classification with class weights, written with loss(model, batch)."""

    def train_dataset(self):
        return classification_data()

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, weight=WEIGHTS.to(x.device))


class WithCriterion(WithLoss):
    """The same task, written as a plain PyTorch program would: a criterion module."""

    loss = None  # type: ignore[assignment]
    criterion = nn.CrossEntropyLoss(weight=WEIGHTS)


class PlainLoss(WithLoss):
    """Without class weights: the mean over a batch is the same however the batch is split."""

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)


class PlainCriterion(WithLoss):
    loss = None  # type: ignore[assignment]
    criterion = nn.CrossEntropyLoss()


class CriterionFunction(WithLoss):
    """A criterion method of (outputs, targets)."""

    loss = None  # type: ignore[assignment]

    def criterion(self, outputs, targets):
        return F.cross_entropy(outputs, targets, weight=WEIGHTS.to(outputs.device))


def log_softmax_nll(outputs, targets):
    """A module-level loss function: `criterion = log_softmax_nll` in a class body stays a function."""
    return F.nll_loss(F.log_softmax(outputs, dim=-1), targets, weight=WEIGHTS.to(outputs.device))


class FunctionalClassAttribute(WithLoss):
    """`criterion = F.nll_loss`-style: a plain function as a class attribute, not a method."""

    loss = None  # type: ignore[assignment]
    criterion = log_softmax_nll


class CriterionFactory(WithLoss):
    """criterion() returns the criterion, the way model() returns the model."""

    loss = None  # type: ignore[assignment]

    def criterion(self):
        return nn.CrossEntropyLoss(weight=WEIGHTS)


class LossAndCriterion(WithLoss):
    """loss(model, batch) that uses the task's own criterion: loss wins."""

    criterion = nn.CrossEntropyLoss()

    def loss(self, model, batch):
        x, y = batch
        return 2 * self.criterion(model(x), y)


class CriterionWithParameters(WithLoss):
    loss = None  # type: ignore[assignment]
    criterion = nn.Sequential(nn.Linear(3, 3), nn.CrossEntropyLoss())


class CriterionNotCallable(WithLoss):
    loss = None  # type: ignore[assignment]
    criterion = "cross_entropy"


class PerSampleCriterion(WithLoss):
    loss = None  # type: ignore[assignment]
    criterion = nn.CrossEntropyLoss(reduction="none")


class DictBatches(WithLoss):
    """A criterion with batches that are not (inputs, targets) pairs."""

    loss = None  # type: ignore[assignment]
    criterion = nn.CrossEntropyLoss()

    def train_dataset(self):
        data = classification_data()
        return [{"x": x, "y": y} for x, y in data]


class NeitherLossNorCriterion(WithLoss):
    loss = None  # type: ignore[assignment]
