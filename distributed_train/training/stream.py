"""The training data as a stream of optimizer steps that owns its world-size-free position."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import IterableDataset

from distributed_train.batches import BatchPlan
from distributed_train.config import Config
from distributed_train.errors import UsageError
from distributed_train.training.data import TrainBatchSampler, make_loader
from distributed_train.training.iterable import IterableStream


def open_train_stream(train_set: Any, config: Config, plan: BatchPlan, rank: int, collate: Callable | None,
                      pin_memory: bool) -> tuple[TrainStream | IterableStream, int]:
    """This rank's stream of training steps over the task's dataset, and the steps to train:
    `train.max_steps`, else `train.epochs` of a map-style dataset (a stream has no length)."""
    data = config.data
    if isinstance(train_set, IterableDataset):
        if not config.train.max_steps:
            raise UsageError("task.train_dataset() is an IterableDataset (a stream without a length): set "
                             "train.max_steps, the optimizer steps to train (train.epochs cannot be counted)")
        if getattr(train_set, "_distributed", None) is not None:  # datasets.distributed.split_dataset_by_node
            raise UsageError("task.train_dataset() returned a stream already split by node "
                             "(split_dataset_by_node); return the whole stream: dtrain gives each rank its part")
        if data.num_workers > 0 and (getattr(train_set, "n_shards", 1) or 1) > 1:
            # A Hugging Face stream of several shards gives each DataLoader worker its own shards:
            # the worker would then split an already split stream, and samples would be lost.
            raise UsageError(f"task.train_dataset() is a stream of {train_set.n_shards} shards that splits "
                             "itself across DataLoader workers; dtrain splits the stream by rank and by "
                             "worker: set data.num_workers=0")
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
