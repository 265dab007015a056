"""The `ddp` engine: wrap the model, run one optimizer step over a global batch, own precision.

The gradient of a step equals the gradient of the mean loss over the whole global batch:
each rank averages its micro-batch losses (scaled by 1/accumulation_steps) and DDP averages
across ranks (a loss given as (sum, count): see EngineBase.divide_by_count). Gradients are
all-reduced only on the last micro-step (`no_sync` before).
"""

from __future__ import annotations

import contextlib
import re
from typing import ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_train.batches import BatchPlan
from distributed_train.config import Config
from distributed_train.distributed import DistEnv, diagnose
from distributed_train.engines.base import EngineBase
from distributed_train.engines.common import (
    attach_shm_allreduce,
    batch_statistics,
    build_model,
    build_optimizer,
    check_comm_hook,
    grad_scaler,
    lr_schedule,
)
from distributed_train.engines.units import checkpoint_activations
from distributed_train.errors import UsageError
from distributed_train.task import Task


class DDPEngine(EngineBase):
    """Model (wrapped in DDP on more than one rank), optimizer, LR schedule and GradScaler of one rank."""

    def __init__(self, task: Task, config: Config, env: DistEnv, device: torch.device,
                 plan: BatchPlan, total_steps: int):
        super().__init__(task, config, env, device, plan)
        check_comm_hook(config.ddp.comm_hook, device)
        self.raw_model = batch_statistics(build_model(task, device, self.float_dtype), config, env, device)
        checkpoint_activations(task, self.raw_model, config)
        self.optimizer = build_optimizer(task, self.raw_model, config)
        self.scheduler = lr_schedule(task, self.optimizer, config, total_steps)
        self.scaler = grad_scaler(config.train.precision, device)
        self.model = self._wrap(self.raw_model)
        self._trainable: list[nn.Parameter] | None = None  # checked for a gradient after each backward
        if isinstance(self.model, DDP):
            self.last_backward = "backward (DDP gradient all-reduce)"

    def _wrap(self, model: nn.Module) -> nn.Module:
        # DDP(compile(model)), not compile(DDP(model)): the latter graph-breaks and compiles nothing.
        if self.config.train.compile:
            model = torch.compile(model)
        if not self.env.is_distributed or (self.env.world_size == 1 and not self.config.ddp.wrap_one_rank):
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

    def micro_step(self, last: bool) -> ContextManager:
        # Only the last micro-step all-reduces; earlier ones accumulate locally (nanoGPT's trick).
        if not isinstance(self.model, DDP):
            return contextlib.nullcontext()
        return self._unused_named(self.model.no_sync() if not last else contextlib.nullcontext())

    @contextlib.contextmanager
    def _unused_named(self, sync: ContextManager):
        """DDP's 'Expected to have finished reduction' in one line naming the parameters. The check
        after each backward cannot see the case that raises it: with accumulation, a parameter that
        got a gradient in an earlier micro-batch but none in the last (the one DDP reduces) has a
        gradient all the same. DDP then fails at the next step's forward, giving the indices."""
        try:
            with sync:
                yield
        except RuntimeError as exc:
            if "Expected to have finished reduction" not in str(exc):
                raise
            ddp = self.config.ddp
            if ddp.static_graph or ddp.find_unused_parameters:
                raise
            found = re.search(r"did not receive grad for rank \d+: ([\d ]+)", str(exc))
            order = [n for n, p in self.raw_model.named_parameters() if p.requires_grad]  # DDP's indices
            names = [order[int(i)] for i in found.group(1).split() if int(i) < len(order)] if found else []
            raise UsageError(diagnose.unused_parameters_message(
                names or ["names not given by DDP"], diagnose.position.step - 1, self.env.rank,
                last_micro_batch=self.plan.accumulation_steps > 1)) from None

    def after_backward(self) -> None:
        """A parameter that got no gradient on this rank, at any step (a conditional branch, expert
        routing): DDP would leave its bucket unreduced, the other ranks would wait for it in their
        all-reduce, and DDP would fail one step later with a cryptic 'Expected to have finished
        reduction', if the wait did not time out first. Found here, before any collective, in one
        line naming the parameters (a pass over the parameter list, measured on this 2-core CPU: 6 us per
        step for 100 parameter tensors, 28 us for 500)."""
        if self._trainable is None:
            ddp = self.config.ddp
            checked = isinstance(self.model, DDP) and not (ddp.find_unused_parameters or ddp.static_graph)
            self._trainable = [p for p in self.raw_model.parameters() if p.requires_grad] if checked else []
        if any(p.grad is None for p in self._trainable):
            unused = [n for n, p in self.raw_model.named_parameters() if p.requires_grad and p.grad is None]
            raise UsageError(diagnose.unused_parameters_message(unused, diagnose.position.step, self.env.rank))
