"""Units: the submodules that `fsdp` shards one at a time and activation checkpointing recomputes.

Default units are the blocks of the model's `nn.ModuleList`s (a transformer's layers); a task
names its own with `shard_units(model)`, a config with `fsdp.units` (module class names). A model
without either is one unit: the whole model.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distributed_train.errors import UsageError
from distributed_train.task import Task


def find_units(task: Task, model: nn.Module, class_names: list[str]) -> list[nn.Module]:
    """The task's `shard_units(model)`, else modules of the classes `fsdp.units` names, else the
    blocks of the model's ModuleLists; outermost first. [] means the whole model is one unit."""
    own = task.shard_units(model)
    if own is not None:
        inside = {id(m) for m in model.modules() if m is not model}
        if not all(id(u) in inside for u in own):
            raise UsageError("task.shard_units(model) must return submodules of the model (not the model itself)")
        return own
    if class_names:
        units = [m for m in model.modules() if type(m).__name__ in class_names and m is not model]
        if not units:
            known = sorted({type(m).__name__ for m in model.modules()})
            raise UsageError(f"fsdp.units={class_names}: the model has no module of those classes; "
                             f"its classes are {', '.join(known)}")
        return units
    return [block for lst in _outermost_module_lists(model) for block in lst]


def _outermost_module_lists(model: nn.Module) -> list[nn.ModuleList]:
    """ModuleLists of the model that are not inside another one (nested lists stay in their block)."""
    found: list[nn.ModuleList] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and not any(_contains(outer, module) for outer in found):
            found.append(module)
    return found


def _contains(outer: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in outer.modules())


def outermost(units: list[nn.Module]) -> list[nn.Module]:
    """The units that are not inside another unit."""
    return [u for u in units if not any(o is not u and _contains(o, u) for o in units)]


def unit_names(model: nn.Module, units: list[nn.Module]) -> dict[int, str]:
    """id(unit) -> its qualified name in the model."""
    ids = {id(u) for u in units}
    return {id(m): name for name, m in model.named_modules() if id(m) in ids}


def check_tied_weights(model: nn.Module, units: list[nn.Module]) -> None:
    """A parameter shared by two units (tied weights) would be sharded twice: explain in one line."""
    names = unit_names(model, units)
    prefixes = sorted((n for n in names.values()), key=len, reverse=True)  # innermost unit first
    owners: dict[int, tuple[str, str]] = {}
    for fqn, param in model.named_parameters(remove_duplicate=False):
        owner = next((p for p in prefixes if fqn.startswith(p + ".")), "")
        seen = owners.setdefault(id(param), (fqn, owner))
        if seen[1] != owner:
            where = lambda unit: f"unit {unit}" if unit else "the model outside every unit"  # noqa: E731
            raise UsageError(
                f"engine=fsdp: {seen[0]} and {fqn} are one tied parameter but belong to {where(seen[1])} "
                f"and {where(owner)}; put both in one unit (task.shard_units / fsdp.units) or untie them")


def checkpoint_activations(task: Task, model: nn.Module, config: Any) -> None:
    """Apply train.activation_checkpointing to the task's units (ddp and accelerate engines)."""
    if config.train.activation_checkpointing == "units":
        checkpoint_units(model, find_units(task, model, config.fsdp.units))


def checkpoint_units(model: nn.Module, units: list[nn.Module]) -> None:
    """train.activation_checkpointing=units: each unit keeps only its inputs in forward and
    recomputes the rest in backward. The module itself stays in place, so parameter names (and
    checkpoints) are the same with and without it."""
    if not units:
        raise UsageError("train.activation_checkpointing=units: the model has no units (no nn.ModuleList of "
                         "blocks); name them with fsdp.units (class names) or the task's shard_units(model)")
    for unit in outermost(units):
        unit.forward = functools.partial(_recomputed, unit.forward)


def _recomputed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    # Non-reentrant: works with keyword arguments, with inputs that need no grad, and under FSDP.
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
