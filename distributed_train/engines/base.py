"""The engine interface the trainer depends on, and the one optimizer step every engine runs.

An engine owns the model (wrapped for the parallelism it implements), the optimizer, the LR
schedule and mixed precision; the trainer owns data, logging, evaluation and checkpoints and
talks to an engine only through `Engine`.

The three engines (ddp, fsdp, accelerate) are siblings around `EngineBase`: the micro-batch loop,
loss scaling, clipping and the non-finite skip are written once in `EngineBase.train_step`; each
engine supplies the small parts that differ (how a non-final micro-step skips the gradient sync,
how its gradients are clipped, what it checks after the first backward).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterable, Iterator, Protocol

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_train import batches
from distributed_train.batches import BatchPlan, move_to_device
from distributed_train.config import Config
from distributed_train.distributed import (
    DistEnv,
    diagnose,
    reduce_and_read,
    shm_allreduce,
)
from distributed_train.engines.common import autocast_context, float_dtype, is_dtensor
from distributed_train.task import Task


class Engine(Protocol):
    """What the trainer, the checkpoints and the memory figures need from an engine."""

    model: nn.Module  # what task.loss() sees in training (maybe wrapped in DDP)
    raw_model: nn.Module  # the task's own module (under fsdp: sharded in place, parameters are DTensors)
    optimizer: torch.optim.Optimizer  # the torch optimizer over raw_model: its state is what checkpoints hold
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per optimizer step
    non_blocking: bool  # host-to-device copies may be asynchronous (CUDA)
    shm_allreduce: shm_allreduce.SharedMemoryAllReduce | None  # set when gradients go through /dev/shm
    skipped_steps: int  # train.nonfinite=skip: updates skipped since this process started
    # Every eval forward is a collective (a sharded model): all ranks run as many eval batches.
    eval_in_lockstep: bool
    # No rank holds the whole model and optimizer state (fsdp): every rank saves its shard together.
    state_is_sharded: bool
    float_dtype: torch.dtype | None  # train.precision=fp64: floating batch tensors are cast to it

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""

    def train_step(self, micro_batches: Iterable[Any], measure_grad_norm: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over this rank's micro-batches: (mean loss, global grad norm or None)."""

    def eval_model(self) -> nn.Module:
        """The module to evaluate (the same on every rank after `sync_buffers`)."""

    def autocast(self) -> ContextManager:
        """Autocast matching the training precision (for training and evaluation alike)."""

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (collective)."""

    def model_state_dict(self) -> dict:
        """The consolidated model state as CPU tensors (what final_model.pt holds); every rank
        calls it (a collective under fsdp), rank 0's result is the one written."""

    def extra_state(self) -> dict:
        """What a checkpoint needs beyond model and optimizer (LR schedule, scaler): the same on every rank."""

    def load_extra_state(self, state: dict) -> None:
        """Restore `extra_state()` output."""


def holds_shards(model: nn.Module) -> bool:
    """The model's parameters are split across ranks (DTensor shards): no rank holds all of them."""
    return torch_dist.is_initialized() and torch_dist.get_world_size() > 1 and \
        any(is_dtensor(p) for p in model.parameters())


class EngineBase:
    """What every engine shares: its settings, the optimizer step, the state a checkpoint adds.

    An engine's constructor calls `EngineBase.__init__`, then sets `raw_model`, `model`,
    `optimizer`, `scheduler` and, for fp16, `scaler`; it overrides only the parts below that differ.
    """

    # set by the engine's constructor
    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling; its state is checkpointed
    shm_allreduce: shm_allreduce.SharedMemoryAllReduce | None = None  # set when gradients go through /dev/shm
    eval_in_lockstep: bool = False  # the eval model is the task's own, unwrapped
    state_is_sharded: bool = False
    last_backward: str = "backward"  # what a peer waiting on the last micro-step's backward is told

    def __init__(self, task: Task, config: Config, env: DistEnv, device: torch.device, plan: BatchPlan):
        self.task, self.config, self.env, self.device, self.plan = task, config, env, device, plan
        autocast_context(config.train.precision, device)  # fail early on fp16 without CUDA
        self.non_blocking = device.type == "cuda"
        self.float_dtype = float_dtype(config.train.precision)
        self.skipped_steps = 0  # train.nonfinite=skip: steps whose update was skipped
        self.stepped = False  # a step completed in this process (first-step checks are done)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, micro_batches: Iterable[Any], measure_grad_norm: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step; returns (this rank's mean loss, global grad norm or None), on device.

        Each micro-batch loss is divided by the accumulation steps, so the gradient is the mean
        over this rank's share; the engine's sync averages it across ranks on the last micro-step.
        The norm comes with clipping, or when `measure_grad_norm` (the trainer asks on log steps)."""
        steps = self.plan.accumulation_steps
        total = torch.zeros((), device=self.device, dtype=self.float_dtype or torch.float32)
        counted = None  # a task whose loss is (sum, count): the count so far
        with self.step_context():
            self.model.train()
            for i, batch in enumerate(micro_batches):
                last = i == steps - 1
                batch = move_to_device(batch, self.device, self.non_blocking, self.float_dtype)
                with self.micro_step(last):
                    diagnose.at("task.loss()")  # where this rank is, if a peer waits for it
                    with self.autocast():
                        loss, count = self.task.loss_terms(self.model, batch)
                    diagnose.at(self.last_backward if last else "backward")
                    self.backward(loss, steps if count is None else 1)
                total += (loss.detach() / (steps if count is None else 1)).to(total.dtype)
                if count is not None:
                    counted = count if counted is None else counted + count
            self.after_backward()
            if counted is not None:
                total = self.divide_by_count(total, counted)
            diagnose.at("optimizer step")
            grad_norm = self.clip_or_measure(measure_grad_norm)
            if self.config.train.nonfinite == "skip" and not self.finite_everywhere(total, grad_norm):
                self.skip_update()
            else:
                self.optimizer_step()
            self.scheduler.step()
            self.zero_grad()
        self.stepped = True
        return total, grad_norm

    @contextlib.contextmanager
    def step_context(self) -> Iterator[None]:
        """Around one whole step (fsdp: rank 0's buffers first, torch's mistakes explained)."""
        yield

    def micro_step(self, last: bool) -> ContextManager:
        """Around one micro-batch's forward and backward: only the last one syncs gradients."""
        return contextlib.nullcontext()

    def autocast(self) -> ContextManager:
        """Autocast matching the training precision, for training and evaluation."""
        return autocast_context(self.config.train.precision, self.device)

    def backward(self, loss: torch.Tensor, steps: int) -> None:
        scaled = loss / steps
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def after_backward(self) -> None:
        """After the last micro-step's backward (ddp: explain unused parameters on the first step)."""

    def divide_by_count(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """A task whose loss is (sum, count): each rank's gradients hold the sum's gradient averaged
        over the W ranks (DDP's and FSDP's mean); times W / N (N: the count over every rank and
        micro-batch) they are the gradient of the mean over all N terms, as one process would
        take it. One small all-reduce, on the device; returns this rank's share of that mean."""
        if self.env.world_size > 1:
            diagnose.at("all_reduce of the loss count")
            torch_dist.all_reduce(count)
        factor = self.env.world_size / count.clamp_min(1)
        grads: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for param in self.raw_model.parameters():
            if param.grad is not None:  # a shard's own slice under fsdp (in host memory with cpu_offload)
                grad = param.grad.to_local() if is_dtensor(param.grad) else param.grad
                grads.setdefault((grad.device, grad.dtype), []).append(grad)
        for (device, dtype), group in grads.items():
            torch._foreach_mul_(group, factor.to(device, dtype))
        return total * factor.to(total.dtype)

    def clip_or_measure(self, measure: bool) -> torch.Tensor | None:
        """`train.grad_clip` applied, or the norm measured when asked: the global norm, or None."""
        clip = self.config.train.grad_clip
        if clip <= 0 and not measure:
            return None
        norm = self.clip_gradients(clip)
        # Over sharded parameters the norm is a DTensor reduction over every shard: its full
        # value is the global norm. Over replicated ones it is the same on every rank already.
        return norm.full_tensor() if is_dtensor(norm) else norm

    def clip_gradients(self, max_norm: float) -> torch.Tensor | None:
        """Clip to `max_norm` (<= 0: only measure); the norm of the unscaled gradients."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
        if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
            return torch.nn.utils.get_total_norm(grads)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def finite_everywhere(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """train.nonfinite=skip: one small all-reduce (and host sync) so every rank skips alike."""
        bad = (~torch.isfinite(loss)).float()
        if grad_norm is not None:
            bad = bad + (~torch.isfinite(grad_norm)).float()
        return reduce_and_read(bad.reshape(1), "non-finite check") == [0]

    def skip_update(self) -> None:
        """Leave the parameters as they are; the step still counts (data and LR schedule move on)."""
        self.skipped_steps += 1
        if self.scaler:  # lower the scale, as the scaler does after an overflow
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- evaluation and state ------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The module evaluation runs: the task's own, outside the DDP wrapper (no gradient hooks)."""
        return self.raw_model

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running stats), as DDP's next forward would.

        The last forward updated each rank's copy from its own micro-batch; without this, ranks
        would evaluate different models and rank 0's final_model.pt differs from the others'."""
        if isinstance(self.model, DDP) and self.model.broadcast_buffers:
            for buffer in self.raw_model.buffers():
                torch_dist.broadcast(buffer, src=0)

    def model_state_dict(self) -> dict:
        """The whole model's parameters and buffers as CPU tensors, no wrapper prefixes, on rank 0
        ({} on the others: only rank 0 writes final_model.pt, so only it copies to host memory)."""
        if not self.env.is_main:
            return {}
        return batches.to_cpu_copy(self.raw_model.state_dict())  # the checkpoints' copy path, on any device

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
