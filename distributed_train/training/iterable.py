"""Training on an IterableDataset (a stream: Hugging Face `datasets` streaming, WebDataset-style
shards, a generator): the same global batches on any world size, and a world-size-free position.

The split rule. The dataset's own iteration order is the global stream; it is read in chunks of
one global batch B (`train.batch_size`). Global step s trains on chunk s: rank r takes samples
r, r + W, r + 2W, ... of it (DistributedSampler's stride, as for map-style datasets) and cuts its
share into micro-batches. A pass ends at the last whole chunk (the remainder is dropped, like
`drop_last`), so every rank ends a pass at the same step; the next pass iterates the dataset again
(calling its `set_epoch(pass)` first, if it has one). DataLoader worker k of N reads the stream
too and keeps the micro-batches j with j % N == k, so the batches are the same with or without
workers. Each rank (and each worker) reads the whole stream and keeps its part: simple and
exact; a stream expensive to read should be split into files the dataset reads lazily.

The position is (pass, samples of the pass trained on), the same on every rank and every world
size. A resume continues there in one of two ways:
- a dataset with `state_dict()` / `load_state_dict()` (the torchdata "stateful" protocol),
  trained with `data.num_workers=0`: its state at the step boundary is checkpointed and loaded,
  nothing is re-read, and the resume is exact;
- any other: the first samples of the pass are read again and skipped, with one warning: exact
  when the dataset yields the same samples in the same order every pass.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from distributed_train.batches import BatchPlan
from distributed_train.config import DataConfig
from distributed_train.errors import UsageError
from distributed_train.training.workers import next_batches, start_workers, worker_options

log = logging.getLogger("distributed_train")


def is_stateful(dataset: Any) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


def check_stream(dataset: IterableDataset, max_steps: int | None, num_workers: int) -> None:
    """What training on a stream needs, one line each: a step count (it has no length to count
    epochs by), the whole stream (dtrain splits it), no splitting of its own across workers."""
    if not max_steps:
        raise UsageError("task.train_dataset() is an IterableDataset (a stream without a length): set "
                         "train.max_steps, the optimizer steps to train (train.epochs cannot be counted)")
    if getattr(dataset, "_distributed", None) is not None:  # datasets.distributed.split_dataset_by_node
        raise UsageError("task.train_dataset() returned a stream already split by node "
                         "(split_dataset_by_node); return the whole stream: dtrain gives each rank its part")
    if num_workers > 0 and (getattr(dataset, "n_shards", 1) or 1) > 1:
        # A Hugging Face stream of several shards gives each DataLoader worker its own shards: the
        # worker would then split an already split stream, and samples would be lost.
        raise UsageError(f"task.train_dataset() is a stream of {dataset.n_shards} shards that splits itself "
                         "across DataLoader workers; dtrain splits the stream by rank and by worker: set "
                         "data.num_workers=0")


class RankShare(IterableDataset):
    """This rank's micro-batches' samples of one pass, from chunk `first_step` on (module docstring)."""

    def __init__(self, dataset: IterableDataset, plan: BatchPlan, rank: int):
        self.dataset, self.plan, self.rank = dataset, plan, rank
        self.first_step = 0  # the pass's step to start at
        self.skip = 0  # samples of the pass to read and drop first (0: the dataset resumes itself)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        B, W, m, accumulation = (self.plan.global_batch, self.plan.world_size, self.plan.micro_batch,
                                 self.plan.accumulation_steps)
        step, chunk = self.first_step, []
        for sample in itertools.islice(self.dataset, self.skip, None):
            chunk.append(sample)
            if len(chunk) < B:
                continue
            share = chunk[self.rank::W]
            for a in range(accumulation):
                if (step * accumulation + a) % workers == worker:
                    yield from share[a * m:(a + 1) * m]
            step, chunk = step + 1, []


class IterableStream:
    """The TrainStream of an IterableDataset: micro-batches step after step, pass after pass."""

    steps_per_epoch = None  # a stream's length is unknown: train.max_steps counts the steps

    def __init__(self, dataset: IterableDataset, plan: BatchPlan, rank: int, collate: Callable | None,
                 num_workers: int, pin_memory: bool, start_method: str = DataConfig.worker_start_method):
        self.dataset, self.plan = dataset, plan
        self.share = RankShare(dataset, plan, rank)
        self.stateful = is_stateful(dataset) and num_workers == 0
        self.loader = DataLoader(
            self.share, batch_size=plan.micro_batch, collate_fn=collate or default_collate,
            num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
            **worker_options(num_workers, start_method))
        self.epoch = 0
        self.step_in_epoch = 0
        self._batches: Iterator[Any] | None = None
        self._resume_state: Any = None  # the dataset's checkpointed state, loaded when the pass restarts

    def next_step(self) -> list[Any]:
        """This rank's micro-batches of the next optimizer step (the position moves on `advance`)."""
        if self._batches is None:
            self._start_pass()
        try:
            return next_batches(self._batches, self.plan.accumulation_steps)
        except StopIteration:  # the pass ended (every rank at this same step): the next one
            if self.step_in_epoch == 0:
                raise UsageError(f"task.train_dataset() yielded fewer samples than one global batch "
                                 f"(train.batch_size={self.plan.global_batch}) in a whole pass") from None
            self.epoch, self.step_in_epoch, self._batches = self.epoch + 1, 0, None
            return self.next_step()

    def _start_pass(self) -> None:
        self.share.first_step = self.step_in_epoch
        self.share.skip = self.step_in_epoch * self.plan.global_batch
        # The pass number first, also before a saved state is loaded: Hugging Face streams apply a
        # state only in the pass it was taken in (else they start the pass over, silently).
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(self.epoch)
        if self._resume_state is not None:
            self.dataset.load_state_dict(self._resume_state)
            self._resume_state, self.share.skip = None, 0
        self._batches = start_workers(self.loader)

    def advance(self) -> None:
        """The step's batches were trained on: move the position past them."""
        self.step_in_epoch += 1

    def state_dict(self) -> dict:
        position = {"epoch": self.epoch, "samples_in_epoch": self.step_in_epoch * self.plan.global_batch}
        if self.stateful and self._batches is not None:  # its state after the last whole chunk read
            position["dataset_state"] = self.dataset.state_dict()
        return position

    def load_state_dict(self, position: dict) -> None:
        """Continue at a saved position: from the dataset's own state when it has one (and this
        run can use it), else by reading the pass again up to there (one warning)."""
        self.epoch = position["epoch"]
        self.step_in_epoch = -(-position["samples_in_epoch"] // self.plan.global_batch)
        self._batches = None
        state = position.get("dataset_state")
        if self.stateful and state is not None and \
                self.step_in_epoch * self.plan.global_batch == position["samples_in_epoch"]:
            self._resume_state = state
        elif self.step_in_epoch:
            log.warning("resuming the stream of task.train_dataset() by reading its first %d samples of pass %d "
                        "again and skipping them: exact only if it yields the same samples in the same order "
                        "every pass (a dataset with state_dict()/load_state_dict() and data.num_workers=0 "
                        "resumes without re-reading)", self.step_in_epoch * self.plan.global_batch, self.epoch)

