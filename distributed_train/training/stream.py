"""The training data as a stream of optimizer steps that owns its world-size-free position."""

from __future__ import annotations

from typing import Any, Iterator

from distributed_train.batches import BatchPlan
from distributed_train.training.data import TrainBatchSampler


class TrainStream:
    """Micro-batches step after step, epoch after epoch; the position is (epoch, samples consumed
    in it), so a checkpoint taken on W ranks resumes on any other world size."""

    def __init__(self, loader: Any, sampler: TrainBatchSampler, plan: BatchPlan):
        self.loader, self.sampler, self.plan = loader, sampler, plan
        self.steps_per_epoch = sampler.steps_per_epoch
        self.epoch = 0
        self.step_in_epoch = 0
        self._batches: Iterator[Any] | None = None

    def next_step(self) -> list[Any]:
        """This rank's micro-batches of the next optimizer step (the position moves on `advance`)."""
        if self._batches is None:
            # set_position is the DistributedSampler's set_epoch: never forgotten, also mid-epoch.
            self.sampler.set_position(self.epoch, self.step_in_epoch)
            self._batches = iter(self.loader)
        return [next(self._batches) for _ in range(self.plan.accumulation_steps)]

    def advance(self) -> None:
        """The step's batches were trained on: move the position past them."""
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self._batches = None  # the next epoch has its own permutation

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_in_epoch": self.step_in_epoch * self.plan.global_batch}

    def load_state_dict(self, position: dict) -> None:
        """Continue at a saved position. With an unchanged global batch it is a whole number of
        steps; after an allowed batch-size change, round up to the next step."""
        self.epoch = position["epoch"]
        self.step_in_epoch = -(-position["samples_in_epoch"] // self.plan.global_batch)
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self._batches = None
