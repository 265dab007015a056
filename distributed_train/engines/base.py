"""The engine interface the trainer depends on, and what the engines share.

An engine owns the model (wrapped for the parallelism it implements), the optimizer, the LR
schedule and mixed precision; the trainer owns data, logging, evaluation and checkpoints and
talks to an engine only through `Engine`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, ContextManager, Iterable, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_train.config import Config
from distributed_train.dist import DistEnv, shm_allreduce
from distributed_train.errors import UsageError
from distributed_train.task import Task


class Engine(Protocol):
    """What the trainer needs from an engine (ddp, fsdp, accelerate)."""

    model: nn.Module  # what task.loss() sees in training (maybe wrapped in DDP)
    raw_model: nn.Module  # the task's own module (under fsdp: sharded in place, parameters are DTensors)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per optimizer step
    non_blocking: bool  # host-to-device copies may be asynchronous (CUDA)
    shm_allreduce: shm_allreduce.SharedMemoryAllReduce | None  # set when gradients go through /dev/shm
    skipped_steps: int  # train.nonfinite=skip: updates skipped since this process started
    # Every eval forward is a collective (a sharded model): all ranks run as many eval batches.
    eval_in_lockstep: bool
    float_dtype: torch.dtype | None  # train.precision=fp64: floating batch tensors are cast to it

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""

    def train_step(self, micro_batches: Iterable[Any], measure_grad_norm: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over this rank's micro-batches: (mean loss, global grad norm or None)."""

    def eval_model(self) -> nn.Module:
        """The module to evaluate (the same on every rank after `sync_buffers`)."""

    def eval_context(self) -> ContextManager:
        """Autocast for evaluation, matching training precision."""

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (collective)."""

    def model_state_dict(self) -> dict:
        """The consolidated model state as CPU tensors (what final_model.pt holds); every rank
        calls it (a collective under fsdp), rank 0's result is the one written."""

    def extra_state(self) -> dict:
        """What a checkpoint needs beyond model and optimizer (LR schedule, scaler): the same on every rank."""

    def load_extra_state(self, state: dict) -> None:
        """Restore `extra_state()` output."""

    def state_dict(self) -> dict:
        """Model, optimizer, schedule and scaler in one dict (single-file checkpoints of older versions)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output."""


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_dtensor(tensor: Any) -> bool:
    """A DTensor (an fsdp shard), checked without importing torch.distributed.tensor (~0.6 s of
    every worker's start) when nothing has: then no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def float_dtype(precision: str) -> torch.dtype | None:
    """The dtype every floating parameter and batch tensor takes: float64 with train.precision=fp64
    (numerics debugging; rounding ~1e-16, so 1 and N ranks agree far below any real defect), else
    None (the task's own dtypes)."""
    return torch.float64 if precision == "fp64" else None


def build_model(task: Task, config: Config, device: torch.device) -> nn.Module:
    """The task's model on `device`, its floating parameters and buffers in `float_dtype` if set."""
    model = task.model().to(device)
    dtype = float_dtype(config.train.precision)
    return model.to(dtype) if dtype is not None else model


def build_optimizer(task: Task, model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """The task's own optimizer if it has one, else AdamW/SGD from `train.*`."""
    own = task.optimizer(model.parameters(), config)
    if own is not None:
        return own
    train = config.train
    kernel = optimizer_kernel(model, train.optimizer)
    if train.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                               weight_decay=train.weight_decay, **kernel)
    return torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, **kernel)


def optimizer_kernel(model: nn.Module, optimizer: str = "adamw") -> dict:
    """{"fused": True} where torch has a fused kernel for every parameter, else {"foreach": True}.

    The fused AdamW update is one kernel over all parameters: on CPU it takes a third of the
    time of the foreach one (0.13 vs 0.38 ms for the digits MLP, 1.0 vs 3.9 ms for charlm tiny).
    """
    fused_devices = {"cpu", "cuda", "xpu", "mps"}
    params = list(model.parameters())
    if optimizer == "sgd" and any(is_dtensor(p) for p in params):
        return {"foreach": True}  # torch has no fused SGD for sharded (fsdp) parameters
    if params and all(p.is_floating_point() and p.device.type in fused_devices for p in params):
        return {"fused": True}
    return {"foreach": True}


def check_comm_hook(comm_hook: str, device: torch.device) -> None:
    """torch's bf16 compression hook needs NCCL (it raises a TypeError deep in DDP otherwise)."""
    if comm_hook == "bf16" and device.type != "cuda":
        raise UsageError("ddp.comm_hook=bf16 needs CUDA GPUs (torch's bf16 hook runs on NCCL only); "
                         "use ddp.comm_hook=fp16 or none on CPU")


def attach_shm_allreduce(model: nn.Module, env: DistEnv, device: torch.device,
                         config: Config) -> shm_allreduce.SharedMemoryAllReduce | None:
    """Average a DDP `model`'s gradient buckets through shared memory when ddp.shm_allreduce allows it
    (collective: every rank calls it). Returns the reducer, or None when the backend keeps the job
    (no DDP, or ddp.comm_hook compresses the backend's all-reduce)."""
    if not isinstance(model, DDP) or config.ddp.comm_hook != "none":
        return None
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    reducer = shm_allreduce.setup(env, device, config.ddp.shm_allreduce, gradient_bytes, config.dist.timeout_s)
    if reducer is not None:
        model.register_comm_hook(state=None, hook=reducer.hook)
    return reducer


def lr_factor(step: int, config: Config, total_steps: int) -> float:
    """Multiplier of `train.lr` at `step`: linear warmup, then constant or cosine to `min_lr`."""
    train = config.train
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    floor = train.min_lr / train.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_context(precision: str, device: torch.device) -> Any:
    """An autocast context for bf16/fp16 (fp16 only on CUDA), or a null context for fp32 and fp64."""
    if precision == "fp64" and device.type not in ("cpu", "cuda"):
        raise UsageError(f"train.precision=fp64 needs a CPU or CUDA device ({device.type} has no float64); "
                         "use fp32")
    if precision in ("fp32", "fp64"):
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.autocast(device.type, dtype=_DTYPES[precision])


class EngineState:
    """What the DDP-style engines share: the learning rate, rank 0's buffers, the checkpoint format.

    A subclass sets `model` (maybe wrapped in DDP), `raw_model`, `optimizer`, `scheduler` and
    `scaler` (or None) in its constructor.
    """

    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    non_blocking: bool = False
    float_dtype: torch.dtype | None = None
    skipped_steps: int = 0

    shm_allreduce: shm_allreduce.SharedMemoryAllReduce | None = None  # set when gradients go through /dev/shm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running stats), as DDP's next forward would.

        The last forward updated each rank's copy from its own micro-batch; without this, ranks
        would evaluate different models and rank 0's final_model.pt differs from the others'."""
        if isinstance(self.model, DDP) and self.model.broadcast_buffers:
            for buffer in self.raw_model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def eval_model(self) -> nn.Module:
        """The module evaluation runs: the task's own, outside the DDP wrapper (no gradient hooks)."""
        return self.raw_model

    def model_state_dict(self) -> dict:
        """The whole model's parameters and buffers as CPU tensors, no wrapper prefixes."""
        from distributed_train.training.data import to_cpu_copy

        return to_cpu_copy(self.raw_model.state_dict())  # the checkpoints' copy path, on any device

    def extra_state(self) -> dict:
        """LR scheduler and scaler state: small, the same on every rank."""
        state = {"scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def state_dict(self) -> dict:
        """Model, optimizer, scheduler and scaler state (model keys without `module.`)."""
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_extra_state(state)
