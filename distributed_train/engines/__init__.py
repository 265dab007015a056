"""Engines: how one optimizer step runs across ranks. `ddp` (torch DDP, the default), `fsdp`
(torch FSDP2 sharding) and `accelerate` (Hugging Face Accelerate) implement `base.Engine` as
siblings around `base.EngineBase`'s one optimizer step; the trainer builds one here."""

from __future__ import annotations

import torch

from distributed_train.batches import BatchPlan
from distributed_train.config import Config
from distributed_train.distributed import DistEnv
from distributed_train.engines.base import Engine
from distributed_train.task import Task


def build_engine(task: Task, config: Config, env: DistEnv, device: torch.device, plan: BatchPlan,
                 total_steps: int) -> Engine:
    """The engine `config.engine` names (accelerate is imported only when asked: a heavy import)."""
    if config.engine == "accelerate":
        from distributed_train.engines.accelerate import AccelerateEngine

        return AccelerateEngine(task, config, env, device, plan, total_steps)
    if config.engine == "fsdp":
        from distributed_train.engines.fsdp import FSDPEngine

        return FSDPEngine(task, config, env, device, plan, total_steps)
    from distributed_train.engines.ddp import DDPEngine

    return DDPEngine(task, config, env, device, plan, total_steps)
