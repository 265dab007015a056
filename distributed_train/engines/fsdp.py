"""The `fsdp` engine: torch's FSDP2 (`fully_shard`) on each unit, then on the whole model.

Every rank holds 1/W of the parameters, gradients and optimizer state. A unit's parameters are
all-gathered just before its forward (and again before its backward when
`fsdp.reshard_after_forward`), and its gradients are reduce-scattered, averaged, right after its
backward: the same mean over the global batch as `ddp`. With `fsdp.replicate=R` (HSDP) ranks
form R groups; parameters are sharded within a group and gradients also all-reduced across groups.

The step itself (micro-batches, no communication before the last one, clipping, non-finite
handling) is `EngineBase`'s, as for `ddp`: only wrapping, synchronisation and state differ.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, ContextManager, Iterator

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from distributed_train.batches import BatchPlan
from distributed_train.config import Config
from distributed_train.distributed import DistEnv
from distributed_train.engines.base import EngineBase
from distributed_train.engines.common import build_model, build_optimizer, grad_scaler, lr_schedule
from distributed_train.engines.units import (
    check_tied_weights,
    checkpoint_units,
    find_units,
    outermost,
)
from distributed_train.errors import UsageError
from distributed_train.task import Task

log = logging.getLogger("distributed_train")

_REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "param": None}
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_settings(config: Config, world_size: int, device: torch.device) -> None:
    """The fsdp.* combinations torch would reject later with a long traceback."""
    replicate = config.fsdp.replicate
    if world_size % replicate:
        raise UsageError(f"fsdp.replicate={replicate} must divide the world size ({world_size} ranks)")
    if config.fsdp.cpu_offload and device.type != "cuda":
        raise UsageError("fsdp.cpu_offload needs CUDA GPUs (on CPU the state already lives in host memory); "
                         "remove it")


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group, also as one process without torchrun: a local group of one."""
    if not torch_dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)


def device_mesh(device: torch.device, replicate: int) -> DeviceMesh:
    """1-D mesh over every rank, or replicate x shard (consecutive ranks, e.g. one node, share a shard group)."""
    world_size = torch_dist.get_world_size()
    if replicate == 1:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


def mixed_precision(config: Config) -> MixedPrecisionPolicy:
    """train.precision as FSDP casts: parameters gathered and computed in bf16/fp16, gradients
    reduced in `fsdp.reduce_dtype` (fp32 by default, so the average loses no digits)."""
    if config.train.precision in ("fp32", "fp64"):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=_COMPUTE_DTYPES[config.train.precision],
                                reduce_dtype=_REDUCE_DTYPES[config.fsdp.reduce_dtype])


def start_from_rank_zero(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank before sharding, as DDP broadcasts them when it
    wraps a model: fully_shard keeps each rank's slice of that rank's own copy, so a model() that
    differs between ranks (weights read on rank 0 only) would train a mix of them. One broadcast
    per tensor, in place: no second copy of the model."""
    if torch_dist.get_world_size() > 1:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                torch_dist.broadcast(tensor, src=0)


def shard(model: nn.Module, units: list[nn.Module], mesh: DeviceMesh, config: Config) -> None:
    """fully_shard every unit (innermost first, as FSDP requires), then the root. The root keeps
    its gathered parameters after forward (what FSDP2 does by default, which an explicit True
    would turn off): the backward needs them first (the embedding and LM head of a transformer)."""
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": config.fsdp.reshard_after_forward,
                              "mp_policy": mixed_precision(config)}
    if config.fsdp.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for unit in reversed(units):
        fully_shard(unit, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})


class FSDPEngine(EngineBase):
    """Model sharded with FSDP2, its optimizer over the shards, the LR schedule."""

    eval_in_lockstep = True  # each unit's forward all-gathers its parameters
    last_backward = "backward (FSDP gradient reduce-scatter)"

    def __init__(self, task: Task, config: Config, env: DistEnv, device: torch.device,
                 plan: BatchPlan, total_steps: int):
        super().__init__(task, config, env, device, plan)
        check_settings(config, env.world_size, device)
        ensure_process_group(device)
        model = build_model(task, device, self.float_dtype)
        start_from_rank_zero(model)
        units = find_units(task, model, config.fsdp.units)
        check_tied_weights(model, units)
        if config.train.activation_checkpointing == "units":
            checkpoint_units(model, units)
        if config.train.compile:  # in place, per unit: names stay, FSDP's hooks stay outside the graphs
            for unit in outermost(units) or [model]:
                unit.compile()
        self.units = units
        self.mesh = device_mesh(device, config.fsdp.replicate)
        shard(model, units, self.mesh, config)
        self.model = self.raw_model = model
        self.optimizer = build_optimizer(task, model, config)
        self.scheduler = lr_schedule(task, self.optimizer, config, total_steps)
        self.scaler = grad_scaler(config.train.precision, device)
        self.state_is_sharded = torch_dist.get_world_size() > 1
        self._buffers = list(model.buffers())

    # -- the step's parts ----------------------------------------------------------------------
    @contextlib.contextmanager
    def step_context(self) -> Iterator[None]:
        """Buffers come from rank 0 first, as DDP's forward does; on the first step, the FSDP
        mistakes torch reports obscurely are explained in one line."""
        self.sync_buffers()
        if self.stepped:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            except RuntimeError as exc:
                if "mixed torch.Tensor and DTensor" not in str(exc):  # torch gives no narrower type
                    raise
                raise UsageError("engine=fsdp: the model uses a unit's parameter outside that unit's forward "
                                 "(there it is a shard); compute with it inside the unit, or make the module "
                                 "that uses it part of the unit (task.shard_units / fsdp.units)") from exc
        for warning in caught:
            if "returned a view tensor" in str(warning.message):
                log.warning("engine=fsdp: a unit returns a view of a tensor; an in-place op on it (x += y) skips "
                            "FSDP's all-gather and gives wrong gradients: use x = x + y or .clone() it")
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    def micro_step(self, last: bool) -> ContextManager:
        # Gradients are reduce-scattered on the last micro-step only; earlier ones accumulate
        # unsharded gradients locally (more memory, no communication).
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # -- evaluation and state ------------------------------------------------------------------
    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running stats): FSDP shards parameters only."""
        if torch_dist.get_world_size() > 1:
            for buffer in self._buffers:
                torch_dist.broadcast(buffer, src=0)

    def eval_model(self) -> nn.Module:
        """The sharded model itself: each unit gathers its parameters for its forward and frees
        them after, as in training, so evaluation never holds the whole model (the Evaluator runs
        every rank through as many batches, since each forward is a collective)."""
        return self.model

    def model_state_dict(self) -> dict:
        """The consolidated model on rank 0 as CPU tensors ({} on the others). Collective."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)
