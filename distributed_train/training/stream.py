"""The training data as a stream of optimizer steps that owns its world-size-free position."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import IterableDataset

from distributed_train.batches import BatchPlan
from distributed_train.config import Config
from distributed_train.training.data import TrainBatchSampler, make_loader
from distributed_train.training.iterable import IterableStream, check_stream
from distributed_train.training.workers import next_batches, start_workers


def open_train_stream(train_set: Any, config: Config, plan: BatchPlan, rank: int, collate: Callable | None,
                      pin_memory: bool) -> tuple[TrainStream | IterableStream, int]:
    """This rank's stream of training steps over the task's dataset, and the steps to train:
    `train.max_steps`, else `train.epochs` of a map-style dataset (a stream has no length)."""
    data = config.data
    if isinstance(train_set, IterableDataset):
        check_stream(train_set, config.train.max_steps, data.num_workers)
        stream = IterableStream(train_set, plan, rank, collate, data.num_workers, pin_memory,
                                data.worker_start_method)
        return stream, config.train.max_steps
    sampler = TrainBatchSampler(len(train_set), plan, rank, config.seed)
    loader = make_loader(train_set, sampler, collate, data.num_workers, pin_memory, config.seed + rank,
                         data.worker_start_method)
    return TrainStream(loader, sampler, plan), config.train.max_steps or config.train.epochs * sampler.steps_per_epoch


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
            self._batches = start_workers(self.loader)
        return next_batches(self._batches, self.plan.accumulation_steps)

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
