"""Exact randomness in `__getitem__`: every sample draws from generators seeded by
(seed, epoch, sample index), whatever process, worker, rank or world size fetches it.

DataLoader workers seed their generators once per worker, so a random augmentation depends on
which worker got the sample, how many workers there are, and how far that worker's stream had
run: a resumed run (or another world size, or another `data.num_workers`) draws other numbers.
Here the sampler tags each index with (seed, epoch), and the dataset view reseeds torch's
default generator, Python's `random` and NumPy's global generator before each `__getitem__`.

Cost, measured on the project's 2-core CPU machine (torch 2.13, NumPy 2.4): 7-14 us per sample
for the three reseeds; without workers also ~0.15 ms per batch to save and put back the training
process's generator states (NumPy's get/set_state is most of it); see docs/language-models.md.
Batch-fetching datasets (`get_batch`, TensorDataset, a `Subset` of them) and datasets with their
own `__getitems__` are fetched a batch at a time and skip this.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler, get_worker_info

_MASK64 = (1 << 64) - 1
EVAL_EPOCH = -1  # eval samples get their own stream, the same at every evaluation


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample: a splitmix64 mix of (seed, epoch, index), so neighbouring
    samples and epochs get unrelated streams."""
    value = 0
    for part in (seed, epoch, index):
        value = ((value ^ (part & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
        value ^= value >> 31
    return value >> 1


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seed the generators a `__getitem__` may use (torch CPU, Python, NumPy) for one sample."""
    value = sample_seed(seed, epoch, index)
    # Not torch.manual_seed: it also seeds every accelerator (~64 us); this costs ~1 us.
    torch.random.default_generator.manual_seed(value)
    random.seed(value)
    np.random.seed(value & 0xFFFFFFFF)


def generator_states() -> tuple:
    """The caller's generator states, to put back after a fetch (training seeds per step anyway,
    but code outside the loop should not see its generators move)."""
    return torch.random.default_generator.get_state(), random.getstate(), np.random.get_state()


def restore_generator_states(states: tuple) -> None:
    torch_state, python_state, numpy_state = states
    torch.random.default_generator.set_state(torch_state)
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class SeededSamples:
    """A dataset view whose items are `(seed, epoch, index)` keys: reseed, then `dataset[index]`."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> list[Any]:
        # A worker's generators serve only its samples; the training process's are put back.
        states = generator_states() if get_worker_info() is None else None
        try:
            samples = []
            for seed, epoch, index in keys:
                seed_sample(seed, epoch, index)
                samples.append(self.dataset[index])
            return samples
        finally:
            if states is not None:
                restore_generator_states(states)


class SeededKeys(Sampler[list[tuple[int, int, int]]]):
    """A batch sampler's index lists as `(seed, epoch, index)` keys; the epoch is read from the
    sampler when iteration starts (the trainer sets it before every epoch)."""

    def __init__(self, batch_sampler: Any, seed: int):
        self.batch_sampler, self.seed = batch_sampler, seed

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = getattr(self.batch_sampler, "epoch", EVAL_EPOCH)
        for indices in self.batch_sampler:
            yield [(self.seed, epoch, index) for index in indices]

    def __len__(self) -> int:
        return len(self.batch_sampler)


def seeds_each_sample(dataset: Any) -> bool:
    """Whether the DataLoader fetches this dataset one `__getitem__` at a time (so reseeding
    per sample applies); a dataset with its own `__getitems__` builds its batch itself."""
    return not callable(getattr(dataset, "__getitems__", None))
