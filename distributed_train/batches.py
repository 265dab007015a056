"""The batch plan (how a global batch splits into ranks and micro-batches) and copies of batches
and states between devices: what the engines and the worker side both need."""

from __future__ import annotations

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
    """The batch (tensor, or tuple/list/dict nesting of them) on `device`; its floating tensors in
    `float_dtype` when given (train.precision=fp64)."""
    if isinstance(batch, torch.Tensor):
        if float_dtype is not None and batch.is_floating_point():
            return batch.to(device, float_dtype, non_blocking=non_blocking)
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(v, device, non_blocking, float_dtype) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def batch_len(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, dict):
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return batch_len(batch[0])
    raise UsageError(f"cannot tell the batch size of a {type(batch).__name__}; batches must hold tensors")


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
