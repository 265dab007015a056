"""The `ddp` engine: wrap the model, run one optimizer step over a global batch, own precision.

The gradient of a step equals the gradient of the mean loss over the whole global batch:
each rank averages its micro-batch losses (scaled by 1/accumulation_steps) and DDP averages
across ranks. Gradients are all-reduced only on the last micro-step (`no_sync` before).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_train.config import Config
from distributed_train.dist import DistEnv, all_reduce_sum, diagnose
from distributed_train.engines.base import (EngineState, attach_shm_allreduce, autocast_context, build_model,
                                           build_optimizer, check_comm_hook, float_dtype, lr_factor)
from distributed_train.engines.units import checkpoint_activations
from distributed_train.errors import UsageError
from distributed_train.task import Task
from distributed_train.training.data import BatchPlan, move_to_device


class DDPEngine(EngineState):
    """Model, optimizer, LR schedule and GradScaler of one rank; `train_step` is the hot path."""

    def __init__(self, task: Task, config: Config, env: DistEnv, device: torch.device,
                 plan: BatchPlan, total_steps: int):
        self.task, self.config, self.env, self.device, self.plan = task, config, env, device, plan
        autocast_context(config.train.precision, device)  # fail early on fp16 without CUDA
        check_comm_hook(config.ddp.comm_hook, device)
        self.float_dtype = float_dtype(config.train.precision)
        self.raw_model = build_model(task, config, device)
        checkpoint_activations(task, self.raw_model, config)
        self.optimizer = build_optimizer(task, self.raw_model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config, total_steps)
        )
        use_scaler = config.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None
        self.model = self._wrap(self.raw_model)
        self.non_blocking = device.type == "cuda"
        self.eval_in_lockstep = False  # the eval model is the task's own, unwrapped
        self.skipped_steps = 0  # train.nonfinite=skip: steps whose update was skipped
        self.checked_unused = False
        self._last_backward = "backward (DDP gradient all-reduce)" if isinstance(self.model, DDP) else "backward"

    def _wrap(self, model: nn.Module) -> nn.Module:
        # DDP(compile(model)), not compile(DDP(model)): the latter graph-breaks and compiles nothing.
        if self.config.train.compile:
            model = torch.compile(model)
        if self.env.world_size == 1 or not self.env.is_distributed:
            return model
        ddp = self.config.ddp
        wrapped = DDP(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=ddp.bucket_cap_mb,
            gradient_as_bucket_view=ddp.gradient_as_bucket_view,
            static_graph=ddp.static_graph,
            find_unused_parameters=ddp.find_unused_parameters,
        )
        if ddp.comm_hook != "none":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = default_hooks.bf16_compress_hook if ddp.comm_hook == "bf16" else default_hooks.fp16_compress_hook
            wrapped.register_comm_hook(state=None, hook=hook)
        self.shm_allreduce = attach_shm_allreduce(wrapped, self.env, self.device, self.config)
        return wrapped

    def _sync_context(self, last_micro_step: bool) -> Any:
        # Only the last micro-step all-reduces; earlier ones accumulate locally (nanoGPT's trick).
        if isinstance(self.model, DDP) and not last_micro_step:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, micro_batches: Iterable[Any], measure_grad_norm: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step; returns (this rank's mean loss, global grad norm or None), on device.

        The norm comes with clipping, or when `measure_grad_norm` (the trainer asks on log steps)."""
        self.model.train()
        steps = self.plan.accumulation_steps
        total = torch.zeros((), device=self.device, dtype=self.float_dtype or torch.float32)
        for i, batch in enumerate(micro_batches):
            batch = move_to_device(batch, self.device, self.non_blocking, self.float_dtype)
            with self._sync_context(i == steps - 1):
                diagnose.at("task.loss()")  # where this rank is, if a peer waits for it
                with autocast_context(self.config.train.precision, self.device):
                    loss = self.task.loss(self.model, batch)
                scaled = loss / steps
                diagnose.at(self._last_backward if i == steps - 1 else "backward")
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += scaled.detach().to(total.dtype)
        if not self.checked_unused:
            self._check_unused_parameters()
        diagnose.at("optimizer step")
        grad_norm = self._clip(measure_grad_norm)
        if self.config.train.nonfinite == "skip" and not self._finite_everywhere(total, grad_norm):
            self._skip_update()
        elif self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def _check_unused_parameters(self) -> None:
        """DDP fails one step later with a cryptic 'Expected to have finished reduction': explain now."""
        self.checked_unused = True
        ddp = self.config.ddp
        if not isinstance(self.model, DDP) or ddp.find_unused_parameters or ddp.static_graph:
            return
        unused = [n for n, p in self.raw_model.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise UsageError(diagnose.unused_parameters_message(unused))

    def _finite_everywhere(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """train.nonfinite=skip: one small all-reduce (and host sync) so every rank skips alike."""
        bad = (~torch.isfinite(loss)).float()
        if grad_norm is not None:
            bad = bad + (~torch.isfinite(grad_norm)).float()
        return all_reduce_sum(bad).item() == 0

    def _skip_update(self) -> None:
        """Leave the parameters as they are; the step still counts (data and LR schedule move on)."""
        self.skipped_steps += 1
        if self.scaler:  # lower the scale, as the scaler does after an overflow
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())

    def _clip(self, measure: bool = False) -> torch.Tensor | None:
        clip = self.config.train.grad_clip
        if clip <= 0 and not measure:
            return None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # Gradients are identical on every rank after the all-reduce, so is the norm.
        if clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
        if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
            return torch.nn.utils.get_total_norm(grads)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def eval_context(self) -> Any:
        """Autocast for evaluation, matching training precision."""
        return autocast_context(self.config.train.precision, self.device)
