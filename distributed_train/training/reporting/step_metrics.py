"""Train metrics: per-step numbers kept on the device between log steps (no host sync per step),
reduced across ranks on log steps so the logged loss is the global one."""

from __future__ import annotations

import time

import torch

from distributed_train import distributed
from distributed_train.config import LogConfig, TrainConfig
from distributed_train.distributed import diagnose
from distributed_train.engines.base import Engine
from distributed_train.engines.common import is_dtensor
from distributed_train.errors import NonFiniteLoss
from distributed_train.task import Task
from distributed_train.training.reporting.flops import MFUMeter
from distributed_train.training.reporting.metrics import MetricsLogger


class TrainWindow:
    """The steps since the last log step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        # One 0-d loss tensor per step, summed when logging: no kernel per step, and the first
        # non-finite step can be named (engines return a new tensor each step).
        self.losses: list[torch.Tensor] = []
        self.grad_norm: torch.Tensor | None = None
        self.data_s = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)


class TrainMetrics:
    """Decides the log steps, reduces each window and writes one `train` event per log step."""

    def __init__(self, train: TrainConfig, log: LogConfig, env: distributed.DistEnv, device: torch.device,
                 task: Task, logger: MetricsLogger, mfu: MFUMeter):
        self.env, self.device, self.task = env, device, task
        self.logger, self.mfu, self.total_steps = logger, mfu, logger.total_steps
        self.global_batch, self.every_steps, self.nonfinite = train.batch_size, log.every_steps, train.nonfinite
        self.window = TrainWindow()
        self.last_loss: float | None = None

    def should_log(self, step: int) -> bool:
        """Train metrics are reduced and logged after this step (every N, and the last)."""
        return step % self.every_steps == 0 or step == self.total_steps

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, data_s: float) -> None:
        self.window.losses.append(loss)
        self.window.grad_norm = grad_norm
        self.window.data_s += data_s
        self.logger.clock.add("data_wait", data_s)

    def log(self, step: int, epoch: int, engine: Engine) -> None:
        """All-reduce the window's mean loss (collective) and log it with the rates; new window."""
        window = self.window
        self.last_loss = self.global_loss(step)  # its host read waits for the window's queued device work
        elapsed = time.perf_counter() - window.start  # so the rates count that work (a GPU runs behind the host)
        event = {
            "kind": "train", "step": step, "epoch": epoch, "loss": self.last_loss, "lr": engine.lr,
            "samples_per_s": window.steps * self.global_batch / elapsed,
            "step_time_s": elapsed / window.steps,
            "data_wait": window.data_s / elapsed,
        }
        if window.grad_norm is not None:
            event["grad_norm"] = window.grad_norm.item()
        if self.nonfinite == "skip":
            event["skipped_steps"] = engine.skipped_steps  # since this run started
        if self.task.tokens_per_sample:
            event["tokens_per_s"] = event["samples_per_s"] * self.task.tokens_per_sample
        if self.env.is_main:
            event["mfu"] = self.mfu(event["samples_per_s"])  # None (left out) when not known
        if self.device.type == "cuda":
            event["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)  # per log window
        self.logger.log({k: v for k, v in event.items() if v is not None})
        self.window = TrainWindow()

    def global_loss(self, step: int) -> float:
        """The window's global mean loss (one all-reduce). With train.nonfinite=error a NaN/inf loss
        on any rank stops every rank here, naming the first such step and rank; this runs on log
        steps and before every checkpoint, so a poisoned state is never committed."""
        losses = self.window.losses
        vector = diagnose.nonfinite_vector(losses, self.env.rank, self.env.world_size, self.device)
        values = distributed.reduce_and_read(vector, "train loss")  # the window's one host read
        problem = diagnose.nonfinite_problem(values, step - len(losses) + 1)
        if problem and self.nonfinite == "error":
            raise NonFiniteLoss(problem)
        total, count = values[:2]
        return total / count if count else float("nan")

    def check_finite(self, step: int) -> None:
        """Before a checkpoint: stop every rank rather than commit a NaN state (collective)."""
        if self.window.losses and self.nonfinite == "error":
            self.global_loss(step)

    def poisoned(self, engine: Engine) -> bool:
        """This rank's state holds NaN/inf (a local check, no collective: the SIGTERM path's guard)."""
        losses = self.window.losses if self.nonfinite == "error" else []
        # This rank's shard only (fsdp): a check of the whole DTensor would be a collective.
        local = [p.to_local() if is_dtensor(p) else p for p in engine.raw_model.parameters()]
        return any(not torch.isfinite(t).all() for t in [*losses, *local])
