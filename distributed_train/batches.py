"""The batch plan (how a global batch splits into ranks and micro-batches) and copies of batches
and states between devices: what the engines and the worker side both need."""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from distributed_train.errors import UsageError


@dataclass(frozen=True)
class BatchPlan:
    """How one global batch is split: B = world_size x micro_batch x accumulation_steps."""

    global_batch: int
    world_size: int
    micro_batch: int
    accumulation_steps: int

    @classmethod
    def make(cls, global_batch: int, world_size: int, micro_batch: int | None) -> "BatchPlan":
        if global_batch % world_size:
            raise UsageError(
                f"train.batch_size ({global_batch}) must be divisible by the world size ({world_size})"
            )
        per_rank = global_batch // world_size
        micro = micro_batch or per_rank
        if per_rank % micro:
            raise UsageError(
                f"train.batch_size ({global_batch}) must be divisible by world size x "
                f"train.micro_batch_size ({world_size} x {micro})"
            )
        return cls(global_batch, world_size, micro, per_rank // micro)


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False,
                   float_dtype: torch.dtype | None = None) -> Any:
    """The batch on `device`, its floating tensors in `float_dtype` when given (train.precision=fp64).

    Tensors in any nesting of mappings (dict, transformers' BatchEncoding, any UserDict: the same
    type back), lists, tuples and namedtuples; another object with a `.to` method (a graph
    library's batch) is moved by it; anything else (strings, numbers) is left as it is."""
    if isinstance(batch, torch.Tensor):
        if float_dtype is not None and batch.is_floating_point():
            return batch.to(device, float_dtype, non_blocking=non_blocking)
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device, non_blocking, float_dtype) for k, v in batch.items()}
        return _same_mapping(batch, moved)
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(v, device, non_blocking, float_dtype) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if callable(getattr(batch, "to", None)) and not isinstance(batch, (str, bytes)):
        return batch.to(device)
    return batch


def _same_mapping(original: Mapping, values: dict) -> Mapping:
    """`values` in `original`'s mapping type, as torch's pin_memory rebuilds one; a plain dict
    when that type cannot be rebuilt so."""
    try:
        if isinstance(original, MutableMapping):
            clone = copy.copy(original)
            clone.update(values)
            return clone
        return type(original)(values)
    except TypeError:
        return values


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor in a batch (depth first through mappings, lists and tuples), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    return next((t for t in map(first_tensor, _parts(batch)) if t is not None), None)


def batch_len(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor that has one, or
    the length of its first list of strings (torch's default_collate gathers strings so)."""
    samples = _samples(batch)
    if samples is None:
        raise UsageError(
            f"cannot tell how many samples a batch ({type(batch).__name__}) holds: it has no tensor with "
            "a batch dimension and no list of strings; return (sum, count) from task.loss, or give the "
            "task a metrics(model, batch) method that returns {'loss': (sum, count)}")
    return samples


def _samples(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(v, (str, bytes)) for v in batch):
        return len(batch)
    return next((n for n in map(_samples, _parts(batch)) if n is not None), None)


def _parts(batch: Any) -> Any:
    """What a batch nests: a mapping's values, a list's or tuple's items, else nothing."""
    return batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()


def to_cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU, so training can go on while it is written.

    The one copy path for checkpoints and final_model.pt, whatever the device. GPU tensors go
    into pinned memory without blocking, all queued at once, then one synchronize: one wait for
    the whole state instead of a blocking copy per tensor into pageable memory (seconds for a
    large model, while the other ranks wait in the next collective). Pinned buffers return to
    torch's cache after the write and serve the next checkpoint."""
    devices: set[torch.device] = set()
    copy = _cpu_copy(obj, devices)
    for device in devices:
        torch.cuda.synchronize(device)
    return copy


def _cpu_copy(obj: Any, cuda_devices: set) -> Any:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        if tensor.device.type == "cuda" and type(tensor) is torch.Tensor:
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            cuda_devices.add(tensor.device)
            return host
        return tensor.to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v, cuda_devices) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v, cuda_devices) for v in obj)
    return obj
