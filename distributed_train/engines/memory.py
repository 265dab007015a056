"""Per-rank memory of the training state (parameters + gradients + optimizer state): measured from
the local shards a rank holds, and predicted from parameter shapes alone (`dtrain estimate`).
Both use the same rules, so a prediction matches the measured `state_bytes_per_rank`."""

from __future__ import annotations

import math

import torch
from torch import nn

from distributed_train import distributed
from distributed_train.engines.common import is_dtensor


def optimizer_slots(optimizer_name: str, group: dict) -> int:
    """Tensors of a parameter's size the optimizer keeps per parameter (Adam: two moments)."""
    if optimizer_name in ("Adam", "AdamW"):
        return 3 if group.get("amsgrad") else 2
    if optimizer_name == "SGD":
        return 1 if group.get("momentum", 0) else 0
    if optimizer_name == "RMSprop":
        return 1 + bool(group.get("momentum", 0)) + bool(group.get("centered"))
    if optimizer_name == "Adagrad":
        return 1
    return 2  # an optimizer we do not know: assume Adam-like


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _bytes(tensor: torch.Tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's parameters, gradients and optimizer state in bytes; the optimizer's state is
    counted where it exists (after a resume), else predicted from its kind (before the first step)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    if optimizer.state:
        optimizer_bytes = sum(_bytes(v) for s in optimizer.state.values() for v in s.values()
                              if isinstance(v, torch.Tensor) and v.dim() > 0)
    else:
        optimizer_bytes = sum(optimizer_slots(type(optimizer).__name__, group) *
                              sum(_bytes(p) for p in group["params"] if p.requires_grad)
                              for group in optimizer.param_groups)
    return {"parameters": sum(map(_bytes, params)), "gradients": sum(map(_bytes, trainable)),
            "optimizer": optimizer_bytes}


def state_bytes_per_rank(engine) -> int:
    """The largest rank's training state in bytes (collective: every rank calls it)."""
    local = sum(state_bytes(engine.raw_model, engine.optimizer).values())
    return max(distributed.all_gather_object(local))


def shard_numel(shape: torch.Size, shards: int) -> int:
    """Elements of the largest shard when FSDP splits a parameter along dim 0 into `shards`."""
    if len(shape) == 0:
        return 1
    return math.ceil(shape[0] / shards) * math.prod(shape[1:])


def predicted_state_bytes(model: nn.Module, slots: int, shards: int) -> dict[str, int]:
    """Rank 0's state when every parameter is split into `shards` (1 = ddp), from shapes only
    (the model may live on the meta device). Parameters, gradients and optimizer state in fp32."""
    params = list(model.parameters())
    local = {id(p): shard_numel(p.shape, shards) * p.element_size() for p in params}
    trainable = sum(local[id(p)] for p in params if p.requires_grad)
    return {"parameters": sum(local.values()), "gradients": trainable, "optimizer": slots * trainable}
