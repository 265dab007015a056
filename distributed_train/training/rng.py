"""Randomness: one seed for model init, a seed per (rank, step) for the step's own randomness
(dropout), and the generator states a checkpoint carries so a resume draws what the
uninterrupted run would have drawn."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical model init; data order comes from the sampler."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's step: randomness (dropout) depends on (seed, rank, step) only,
    so a resumed run draws exactly what the uninterrupted run drew, even after a SIGTERM save."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def reseed_step(seed: int, rank: int, step: int, device: torch.device) -> None:
    """Seed this rank's torch, Python and NumPy generators for `step` (~6 us in all).

    What a step draws then depends on (seed, rank, step) only: a resume after a SIGTERM, which
    saves rank 0's generator states alone (no collectives in that path), still draws what the
    uninterrupted run drew on every rank. Not torch.manual_seed: it visits every backend and
    costs ~130 us on CPU, 5% of a small model's step; the default generator costs ~1 us."""
    value = step_seed(seed, rank, step)
    torch.default_generator.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)
    if device.type == "cuda":
        torch.cuda.manual_seed(value)  # the current device's generator only


def rng_state() -> dict:
    """This rank's RNG states (torch CPU, this rank's GPU, Python, NumPy), loadable with weights_only.

    Only the current GPU's state: a resume on a node with another number of visible GPUs must
    not fail, and the per-step reseed already fixes what the step draws on the device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()` output (a CUDA state is applied only where a GPU is in use)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(cuda)
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
