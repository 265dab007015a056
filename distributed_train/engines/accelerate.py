"""The `accelerate` engine: the same task and the same step math as `ddp`, run by Hugging Face Accelerate.

Only the model and the optimizer go through `accelerator.prepare`. Our world-size-free train
sampler and exact eval keep feeding the data, because a prepared DataLoader would be re-sharded
by Accelerate; our LR schedule is stepped once per optimizer step, because a prepared scheduler
steps `num_processes` times per step. `accumulate()` skips the all-reduce before the last
micro-step and `accelerator.backward` divides the loss by the accumulation steps, so the gradient
is the mean over the global batch, exactly as in the `ddp` engine.

Imported only when `engine=accelerate` (so `import distributed_train` never imports accelerate).
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
)

from distributed_train import batches
from distributed_train.batches import BatchPlan
from distributed_train.config import Config
from distributed_train.distributed import DistEnv
from distributed_train.engines.base import EngineBase, holds_shards
from distributed_train.engines.common import (
    attach_shm_allreduce,
    autocast_context,
    build_model,
    build_optimizer,
    check_comm_hook,
    lr_schedule,
)
from distributed_train.engines.units import checkpoint_activations
from distributed_train.errors import UsageError
from distributed_train.task import Task

MIXED_PRECISION = {"fp32": "no", "fp64": "no", "bf16": "bf16", "fp16": "fp16"}
_COMM_HOOKS = {"none": DDPCommunicationHookType.NO, "bf16": DDPCommunicationHookType.BF16,
               "fp16": DDPCommunicationHookType.FP16}


def mixed_precision(precision: str, device: torch.device) -> str:
    """Accelerate's `mixed_precision` for `train.precision`; fp16 without CUDA fails as in `ddp`."""
    autocast_context(precision, device)
    return MIXED_PRECISION[precision]


def use_cpu(device: torch.device) -> bool:
    """Accelerate's `cpu=` flag: without it, CPU ranks are DistributedType.NO and never sync."""
    return device.type == "cpu"


def check_world(env: DistEnv, num_processes: int, process_index: int, distributed_type: str) -> None:
    """Fail unless Accelerate sees the job torchrun started; otherwise each rank trains alone."""
    if env.world_size == 1:
        return
    if distributed_type == DistributedType.NO or num_processes != env.world_size \
            or process_index != env.rank:
        raise UsageError(
            f"engine=accelerate: Accelerate runs as {distributed_type} with {num_processes} process(es) "
            f"but this job has {env.world_size} ranks, so gradients would not be synchronised; "
            "on CPU set ACCELERATE_USE_CPU=1 (or do not create an Accelerator/PartialState before "
            "training), or use engine=ddp"
        )


def check_device(accelerator_device: torch.device, device: torch.device) -> None:
    """Accelerate must place the model where our data goes (cuda:LOCAL_RANK or cpu)."""
    if accelerator_device.type != device.type or (accelerator_device.index or 0) != (device.index or 0):
        raise UsageError(f"engine=accelerate: Accelerate chose device {accelerator_device}, this rank "
                         f"uses {device}; unset ACCELERATE_TORCH_DEVICE / CUDA_VISIBLE_DEVICES overrides")


def plugin_kwargs(config: Config, plan: BatchPlan, device: torch.device) -> dict:
    """Accelerator(fsdp_plugin=...) or (deepspeed_plugin=...) from `accelerate.fsdp` / `.deepspeed`."""
    settings = config.accelerate
    if not settings.fsdp and not settings.deepspeed:
        return {}
    key = "accelerate.fsdp" if settings.fsdp else "accelerate.deepspeed"
    if device.type != "cuda":
        raise UsageError(f"{key} needs CUDA GPUs (this rank runs on {device}); remove it to train with DDP")
    try:
        if settings.fsdp:
            from accelerate.utils import FullyShardedDataParallelPlugin

            return {"fsdp_plugin": FullyShardedDataParallelPlugin(**settings.fsdp)}
        from accelerate.utils import DeepSpeedPlugin

        # We never prepare a DataLoader, so DeepSpeed cannot infer these from one.
        defaults = {"gradient_accumulation_steps": plan.accumulation_steps}
        if config.train.grad_clip > 0:
            defaults["gradient_clipping"] = config.train.grad_clip
        return {"deepspeed_plugin": DeepSpeedPlugin(**{**defaults, **settings.deepspeed})}
    except (TypeError, ValueError, ImportError) as exc:
        raise UsageError(f"{key}: {str(exc).splitlines()[0]}") from exc


def ddp_kwargs(config: Config) -> DistributedDataParallelKwargs:
    """Our `ddp.*` settings for the DDP wrapper Accelerate builds."""
    ddp = config.ddp
    return DistributedDataParallelKwargs(
        bucket_cap_mb=ddp.bucket_cap_mb, find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view, static_graph=ddp.static_graph,
        comm_hook=_COMM_HOOKS[ddp.comm_hook],
    )


def make_accelerator(config: Config, env: DistEnv, device: torch.device, plan: BatchPlan) -> Accelerator:
    """A fresh Accelerator on the process group `distributed.init` created, checked against our DistEnv."""
    precision = mixed_precision(config.train.precision, device)
    check_comm_hook(config.ddp.comm_hook, device)
    plugins = plugin_kwargs(config, plan, device)
    # Accelerate's state is a per-process singleton: a previous run's (or an earlier PartialState's)
    # settings would win over ours, or clash with them.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    accelerator = Accelerator(
        cpu=use_cpu(device),
        mixed_precision=precision,
        # An explicit plugin ignores ACCELERATE_GRADIENT_ACCUMULATION_STEPS from `accelerate launch`:
        # the accumulation steps are ours (train.batch_size / world / micro_batch_size).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=plan.accumulation_steps, sync_with_dataloader=False, adjust_scheduler=False),
        kwargs_handlers=[ddp_kwargs(config)],
        **plugins,
    )
    torch.set_num_threads(threads)  # Accelerate's MULTI_CPU setup may reset our per-rank share
    check_world(env, accelerator.num_processes, accelerator.process_index, accelerator.distributed_type)
    check_device(accelerator.device, device)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and config.checkpoint.periodic:
        raise UsageError(f"checkpoint.every_steps with {accelerator.distributed_type} is not supported yet "
                         "(checkpoints are written from rank 0's full state); set checkpoint.every_steps=0")
    return accelerator


class AccelerateEngine(EngineBase):
    """`EngineBase`'s step over an Accelerator: its sync, autocast, backward, clipping and optimizer."""

    def __init__(self, task: Task, config: Config, env: DistEnv, device: torch.device,
                 plan: BatchPlan, total_steps: int):
        super().__init__(task, config, env, device, plan)
        if config.train.nonfinite == "skip":
            raise UsageError("train.nonfinite=skip is not implemented by engine=accelerate; "
                             "use engine=ddp, or train.nonfinite=error")
        self.accelerator = make_accelerator(config, env, device, plan)
        self.raw_model = build_model(task, device, self.float_dtype)
        checkpoint_activations(task, self.raw_model, config)
        optimizer = build_optimizer(task, self.raw_model, config)
        self.scheduler = lr_schedule(task, optimizer, config, total_steps)
        # DDP(compile(model)), not compile(DDP(model)): the latter graph-breaks and compiles nothing.
        model = torch.compile(self.raw_model) if config.train.compile else self.raw_model
        self.model, self.prepared_optimizer = self.accelerator.prepare(model, optimizer)
        # The torch optimizer inside Accelerate's wrapper: its state is keyed like any other's.
        self.optimizer = getattr(self.prepared_optimizer, "optimizer", self.prepared_optimizer)
        self.shm_allreduce = attach_shm_allreduce(self.model, env, device, config)  # MULTI_CPU only
        self.scaler = self.accelerator.scaler  # a GradScaler with fp16 (Accelerate drives it), else None
        self.sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.eval_in_lockstep = self.sharded  # its forward gathers the shards
        self.state_is_sharded = holds_shards(self.raw_model)
        self._full_state: dict | None = None  # sharded: the consolidated model, gathered by every rank

    # -- the step's parts: Accelerate's own ----------------------------------------------------
    @contextlib.contextmanager
    def step_context(self) -> Iterator[None]:
        # accumulate() counts micro-steps: start each optimizer step at 0 so only its last one syncs.
        self.accelerator.step = 0
        yield

    def micro_step(self, last: bool) -> ContextManager:
        return self.accelerator.accumulate(self.model)

    def autocast(self) -> ContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor, steps: int) -> None:
        # The unscaled mean loss: Accelerate divides by the accumulation steps (and scales fp16)
        # itself; a (sum, count) loss's sum (steps=1) is to count whole, as under ddp.
        accumulation = self.plan.accumulation_steps
        self.accelerator.backward(loss if steps == accumulation else loss * (accumulation / steps))

    def divide_by_count(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        if self.sharded:  # the plugins' gradients are flat shards (FSDP) or the engine's own (DeepSpeed)
            raise UsageError("engine=accelerate with its FSDP or DeepSpeed plugin cannot divide a (sum, count) "
                             "loss by the count over every rank; use engine=fsdp, or return the mean loss")
        return super().divide_by_count(total, count)

    def after_backward(self) -> None:
        if not self.accelerator.sync_gradients:
            raise RuntimeError(f"engine=accelerate: {self.plan.accumulation_steps} micro-batches expected "
                               "for one optimizer step")

    def clip_gradients(self, max_norm: float) -> torch.Tensor | None:
        # Unscales fp16 gradients first and knows FSDP shards; the norm is global (gradients are
        # already all-reduced). Clipping to inf only measures: the gradients are scaled by exactly 1.
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else math.inf)
        if norm is None:  # DeepSpeed clips inside its own step (the plugin's gradient_clipping)
            return None
        return norm if isinstance(norm, torch.Tensor) else torch.as_tensor(norm, device=self.device)

    def optimizer_step(self) -> None:
        self.prepared_optimizer.step()  # GradScaler step/update with fp16

    def zero_grad(self) -> None:
        self.prepared_optimizer.zero_grad(set_to_none=True)

    # -- evaluation and state ------------------------------------------------------------------
    def eval_model(self) -> torch.nn.Module:
        """Under FSDP/DeepSpeed the prepared model (its forward gathers the shards); else the task's own."""
        return self.model if self.sharded else self.raw_model

    def sync_buffers(self) -> None:
        """As in `ddp`; sharded, every rank also gathers the consolidated model here (a collective),
        since final_model.pt is written by rank 0 alone after the final evaluation."""
        super().sync_buffers()
        if self.sharded:
            self._full_state = batches.to_cpu_copy(self.accelerator.get_state_dict(self.model))

    def model_state_dict(self) -> dict:
        """The whole model as CPU tensors: rank 0's shard alone would be a fraction of it."""
        if self.sharded:
            if self._full_state is None:
                raise RuntimeError("engine=accelerate: the sharded model was not gathered before saving")
            return self._full_state
        return super().model_state_dict()
