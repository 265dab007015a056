"""Samplers and loaders: a world-size-free data position for training, exact sharding for eval.

Training: epoch e uses one permutation of the dataset that depends only on (seed, e). Global
step s of the epoch covers positions [s*B, (s+1)*B) of that permutation, whatever the world
size; rank r takes every W-th of them (DistributedSampler's stride) and cuts its share into
micro-batches. So the data position is just (epoch, samples consumed in the epoch).

Evaluation: each rank takes a contiguous slice of the eval set (or of a fixed subset of it,
`eval.max_samples`) without padding, so every sample is counted exactly once
(DistributedSampler pads with duplicates to equalise ranks).

Randomness inside `__getitem__` is seeded per sample from (seed, epoch, index): see sample_seed.py.

Both rest on every rank building the same datasets; `check_same_sizes` refuses a job whose ranks
do not (a node with a partial copy of the data).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, Subset, TensorDataset, default_collate

from distributed_train import distributed
from distributed_train.batches import BatchPlan
from distributed_train.config import DataConfig
from distributed_train.errors import UsageError
from distributed_train.training.sample_seed import (
    SeededKeys,
    SeededSamples,
    seeds_each_sample,
)
from distributed_train.training.workers import worker_options

# Up to this many samples an epoch's order is torch.randperm (4 bytes per sample, built at the
# start of the epoch); above it, a permutation computed per position that costs nothing up front.
RANDPERM_MAX = 2**22


def epoch_order(n: int, seed: int, epoch: int) -> "torch.Tensor | FeistelPermutation":
    """The order of the n samples in `epoch` (same on every rank and every world size); slicing
    it gives a tensor of sample indices.

    Up to RANDPERM_MAX samples: torch.randperm seeded with seed * 100_003 + epoch, the order
    DistributedSampler(seed=seed * 100_003) gives (int32 where it suffices: 4 bytes per sample).
    A corpus of billions of windows gets a FeistelPermutation instead: no memory, no start-up
    time, whatever n."""
    if n > RANDPERM_MAX:
        return FeistelPermutation(n, seed * 100_003 + epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator, dtype=torch.int32 if n < 2**31 else torch.int64)


class FeistelPermutation:
    """A pseudo-random permutation of range(n) evaluated at any positions: `perm[a:b:c]` costs
    O((b - a) / c), whatever n.

    A balanced Feistel network over 2k bits (4**k >= n) is a bijection of range(4**k); applying
    it again to the values >= n ("cycle walking") makes it one of range(n). Round functions are
    integer hashes that stay below 2**63, so the order is the same on every platform."""

    ROUNDS, PRIME = 6, 2**31 - 1

    def __init__(self, n: int, seed: int):
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        rng = random.Random(seed)
        self.keys = [rng.randrange(1, self.PRIME) for _ in range(2 * self.ROUNDS)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: slice) -> torch.Tensor:
        positions = torch.arange(*index.indices(self.n), dtype=torch.int64)
        values = self._network(positions)
        outside = values >= self.n
        while outside.any():  # each pass leaves ~n / 4**k of them; a few passes in all
            values[outside] = self._network(values[outside])
            outside = values >= self.n
        return values

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        mask = (1 << self.half_bits) - 1
        left, right = x >> self.half_bits, x & mask
        for round_ in range(self.ROUNDS):
            add, mul = self.keys[2 * round_], self.keys[2 * round_ + 1]
            mixed = (right + add) % self.PRIME * mul % self.PRIME  # < 2**62: no overflow
            mixed = (mixed ^ (mixed >> 13)) * 0x5BD1E995 % self.PRIME
            left, right = right, left ^ (mixed & mask)
        return (left << self.half_bits) | right


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """`epoch_order` as a list."""
    return epoch_order(n, seed, epoch)[0:n].tolist()


def steps_per_epoch(dataset_len: int, global_batch: int) -> int:
    """Full global batches in one epoch (the remainder is dropped, a new one each epoch)."""
    steps = dataset_len // global_batch
    if steps == 0:
        raise UsageError(
            f"train.batch_size ({global_batch}) is larger than the training set ({dataset_len} "
            f"sample{'' if dataset_len == 1 else 's'})"
        )
    return steps


class TrainBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches for one epoch, starting at a global step; see module docstring."""

    def __init__(self, dataset_len: int, plan: BatchPlan, rank: int, seed: int):
        self.dataset_len = dataset_len
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch(dataset_len, plan.global_batch)
        self.epoch = 0
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Where the next iteration starts; the trainer calls this before every epoch."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.dataset_len, self.seed, self.epoch)
        B, W, m = self.plan.global_batch, self.plan.world_size, self.plan.micro_batch
        for step in range(self.start_step, self.steps_per_epoch):
            share = order[step * B + self.rank : (step + 1) * B : W].tolist()
            for start in range(0, len(share), m):
                yield share[start : start + m]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.plan.accumulation_steps


def check_same_sizes(train_set: Any, eval_set_size: int | None) -> None:
    """Refuse datasets whose lengths differ between ranks (collective: every rank calls it).

    The samplers split one index space: a rank whose copy of the data is partial would train on
    other samples than one process would, silently, and at the end of its shorter epoch wait in a
    collective its peers never join (a timeout blamed on a slow rank). One small all-gather."""
    train_size = None if isinstance(train_set, IterableDataset) else len(train_set)
    gathered = distributed.all_gather_object((train_size, eval_set_size))
    for i, method in enumerate(("train_dataset()", "eval_dataset()")):
        sizes = [each[i] for each in gathered]
        others = [rank for rank, size in enumerate(sizes) if size != sizes[0]]
        if others:
            raise UsageError(
                f"task.{method} has {_samples(sizes[0])} on rank 0 but {_samples(sizes[others[0]])} "
                f"on rank {others[0]}{f' (and {len(others) - 1} more)' if len(others) > 1 else ''}; every rank must "
                "build the same dataset (give every node the whole data)")


def _samples(size: int | None) -> str:
    return "none" if size is None else f"{size} sample{'' if size == 1 else 's'}"


def eval_shard(dataset_len: int, rank: int, world_size: int) -> range:
    """Rank's contiguous, unpadded slice of the eval set; the slices partition range(n)."""
    return range(rank * dataset_len // world_size, (rank + 1) * dataset_len // world_size)


def eval_subset(dataset_len: int, max_samples: int | None, seed: int) -> Sequence[int]:
    """The eval samples: all of them, or a fixed sorted random subset of `max_samples` that
    depends only on (n, max_samples, seed), so every world size evaluates the same samples."""
    if max_samples is None or max_samples >= dataset_len:
        return range(dataset_len)
    # random.sample over a range keeps only the chosen indices: O(max_samples) for any n.
    return sorted(random.Random(seed).sample(range(dataset_len), max_samples))


class EvalBatchSampler(Sampler[list[int]]):
    """This rank's eval batches: its shard of `subset` (default: every sample) in order, the last
    batch possibly short."""

    def __init__(self, dataset_len: int, rank: int, world_size: int, batch_size: int,
                 subset: Sequence[int] | None = None, seed: int = 0):
        subset = range(dataset_len) if subset is None else subset
        positions = eval_shard(len(subset), rank, world_size)
        self.shard = subset[positions.start:positions.stop]
        self.batch_size = batch_size
        self.seed = seed  # of the samples' randomness (sample_seed.py)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.shard), self.batch_size):
            yield list(self.shard[start : start + self.batch_size])

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)


class _BatchFetch:
    """A dataset view whose `__getitems__` builds a whole batch in one call (no per-sample collate)."""

    def __init__(self, fetch: Callable[[list[int]], Any], length: int):
        self.fetch, self.length = fetch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.fetch([index])

    def __getitems__(self, indices: list[int]) -> Any:
        return self.fetch(indices)


def _already_batched(batch: Any) -> Any:
    return batch


def batch_fetcher(dataset: Any) -> Callable[[list[int]], Any] | None:
    """A function that fetches a whole batch at once, when the dataset allows it exactly."""
    if callable(getattr(dataset, "get_batch", None)):
        return dataset.get_batch
    if isinstance(dataset, TensorDataset):
        return _TensorRows(dataset.tensors)
    if isinstance(dataset, Subset):  # random_split's output: map the indices, fetch from the parent
        inner = batch_fetcher(dataset.dataset)
        return _SubsetRows(inner, dataset.indices) if inner is not None else None
    # Any other dataset with torch's `__getitems__` (a list of samples) gets it called by the
    # DataLoader once per batch, then the collate function.
    return None


class _SubsetRows:
    """A Subset's batch: its indices mapped to the parent's, fetched in one call (picklable)."""

    def __init__(self, fetch: Callable[[list[int]], Any], indices: Any):
        self.fetch, self.indices = fetch, indices

    def __call__(self, indices: list[int]) -> Any:
        return self.fetch([self.indices[i] for i in indices])


class _TensorRows:
    """Rows of a TensorDataset's tensors by one index op each (a class, so workers can pickle it)."""

    def __init__(self, tensors: tuple):
        self.tensors = tensors

    def __call__(self, indices: list[int]) -> tuple:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


class DirectBatches:
    """Whole batches fetched in this process, without a DataLoader iterator around each one."""

    def __init__(self, fetch: Callable[[list[int]], Any], batch_sampler: Sampler):
        self.fetch, self.batch_sampler = fetch, batch_sampler

    def __iter__(self) -> Iterator[Any]:
        return (self.fetch(indices) for indices in self.batch_sampler)

    def __len__(self) -> int:
        return len(self.batch_sampler)


def make_loader(dataset: Any, batch_sampler: Sampler, collate: Callable | None,
                num_workers: int, pin_memory: bool, seed: int,
                start_method: str = DataConfig.worker_start_method) -> DataLoader | DirectBatches:
    """Batches in `batch_sampler` order; batch-fetching datasets skip per-sample collation, and
    without workers or pinning also the DataLoader machinery (~50 us per batch on a small step).
    Samples fetched one at a time are seeded from (sampler's seed, epoch, index) when the
    sampler has a `seed` (the train and eval samplers do). Workers start by `start_method`
    (`data.worker_start_method`, see worker_options)."""
    fetch = batch_fetcher(dataset) if collate is None else None
    if fetch is not None and num_workers == 0 and not pin_memory:
        return DirectBatches(fetch, batch_sampler)
    if fetch is not None:
        dataset, collate = _BatchFetch(fetch, len(dataset)), _already_batched
    elif getattr(batch_sampler, "seed", None) is not None and seeds_each_sample(dataset):
        dataset, batch_sampler = SeededSamples(dataset), SeededKeys(batch_sampler, batch_sampler.seed)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate or default_collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        **worker_options(num_workers, start_method),
    )
