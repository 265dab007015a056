"""The training loop. `Trainer.fit()` reads as prose; the dense work lives in the engine."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dist
from .config import Config, dump_yaml
from .data import (BatchPlan, EvalBatchSampler, TrainBatchSampler, batch_len, make_loader,
                   move_to_device)
from .engine import DDPEngine
from .errors import UsageError
from .metrics import MetricsLogger, log
from .task import Task, load_task


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical model init; data order comes from the sampler."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_dir(task: str) -> str:
    """runs/<task>-<timestamp> under the working directory."""
    name = Path(task.split(":")[-1]).name if ":" in task else task
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


class Trainer:
    """Owns one training job on one rank: data, engine, logging, evaluation and the run directory."""

    # configuration
    config: Config
    env: dist.DistEnv
    device: torch.device
    run_dir: Path
    # components
    task: Task
    engine: DDPEngine
    plan: BatchPlan
    train_sampler: TrainBatchSampler
    logger: MetricsLogger
    # runtime state: the data position is (epoch, step_in_epoch); global_step counts optimizer steps
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    resumed_from: str | None = None

    def __init__(self, config: Config, env: dist.DistEnv, device: torch.device):
        self.config, self.env, self.device = config, env, device
        self.run_dir = Path(config.run_dir)  # resolved by the caller, identical on every rank
        self.task = load_task(config.task, config)
        self.plan = BatchPlan.make(config.train.batch_size, env.world_size, config.train.micro_batch_size)
        seed_everything(config.seed)
        train_set = self.task.train_dataset()
        self.train_sampler = TrainBatchSampler(len(train_set), self.plan, env.rank, config.seed)
        self.steps_per_epoch = self.train_sampler.steps_per_epoch
        self.total_steps = config.train.max_steps or config.train.epochs * self.steps_per_epoch
        pin = config.data.pin_memory if config.data.pin_memory is not None else device.type == "cuda"
        collate = self.task.collate_fn()
        self.train_loader = make_loader(train_set, self.train_sampler, collate,
                                        config.data.num_workers, pin, config.seed + env.rank)
        self.eval_loader = self._eval_loader(collate, pin)
        self.engine = DDPEngine(self.task, config, env, device, self.plan, self.total_steps)
        self.logger = MetricsLogger(config, env, self.run_dir, self.total_steps)

    def _eval_loader(self, collate: Any, pin: bool) -> Any:
        eval_set = self.task.eval_dataset()
        if eval_set is None:
            return None
        global_batch = self.config.eval.batch_size or self.config.train.batch_size
        per_rank = max(1, global_batch // self.env.world_size)
        sampler = EvalBatchSampler(len(eval_set), self.env.rank, self.env.world_size, per_rank)
        return make_loader(eval_set, sampler, collate, 0, pin, self.config.seed)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to `total_steps`, evaluating and logging on the way; returns the summary."""
        self.prepare_run_dir()
        self.logger.start()
        start = time.perf_counter()
        log.info("training %s: %d steps, global batch %d on %d rank(s) (%d micro-batch(es) of %d per rank)",
                 self.task.name, self.total_steps, self.plan.global_batch, self.env.world_size,
                 self.plan.accumulation_steps, self.plan.micro_batch)
        train_time = 0.0
        while self.global_step < self.total_steps:
            epoch_start = time.perf_counter()
            self.train_epoch()
            train_time += time.perf_counter() - epoch_start
        eval_metrics = self.evaluate_and_log()
        samples = self.global_step * self.plan.global_batch
        summary = {
            "global_step": self.global_step,
            "epochs_completed": self.epoch,
            "world_size": self.env.world_size,
            "train_loss": self.last_train_loss,
            "eval": eval_metrics,
            "samples_per_s": samples / train_time if train_time > 0 else None,
            "wall_s": time.perf_counter() - start,
            "final_model": str(self.run_dir / "final_model.pt"),
            "resumed_from": self.resumed_from,
        }
        dist.on_main(self.env, self.write_outputs, summary)
        dist.barrier()
        self.logger.close(summary)
        return summary

    def train_epoch(self) -> None:
        """Run the rest of the current epoch (or until total_steps), then advance the epoch."""
        self.train_sampler.set_position(self.epoch, self.step_in_epoch)
        micro_batches = iter(self.train_loader)
        window = _Window(self.device)
        while self.step_in_epoch < self.steps_per_epoch and self.global_step < self.total_steps:
            fetch_start = time.perf_counter()
            batches = [next(micro_batches) for _ in range(self.plan.accumulation_steps)]
            window.data_s += time.perf_counter() - fetch_start
            loss, grad_norm = self.engine.train_step(batches)
            self.global_step += 1
            self.step_in_epoch += 1
            window.add(loss, grad_norm)
            if self.global_step % self.config.log.every_steps == 0 or self.global_step == self.total_steps:
                self.log_train(window)
                window = _Window(self.device)
            if self.config.eval.every_steps and self.global_step % self.config.eval.every_steps == 0 \
                    and self.global_step < self.total_steps:
                self.evaluate_and_log()
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def log_train(self, window: "_Window") -> None:
        """All-reduce the window's mean loss (the global number, not rank 0's) and log it."""
        elapsed = time.perf_counter() - window.start
        loss = dist.all_reduce_mean(window.loss_sum / window.steps).item()
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss}) between steps {self.global_step - window.steps + 1} and "
                f"{self.global_step}; lower train.lr, enable train.grad_clip, or check the data"
            )
        self.last_train_loss = loss
        event = {
            "kind": "train", "step": self.global_step, "epoch": self.epoch, "loss": loss,
            "lr": self.engine.lr,
            "samples_per_s": window.steps * self.plan.global_batch / elapsed,
            "step_time_s": elapsed / window.steps,
            "data_wait": window.data_s / elapsed,
        }
        if window.grad_norm is not None:
            event["grad_norm"] = window.grad_norm.item()
        if self.task.tokens_per_sample:
            event["tokens_per_s"] = event["samples_per_s"] * self.task.tokens_per_sample
        self.logger.log(event)

    last_train_loss: float | None = None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact metrics over the whole eval set: (sum, count) pairs summed across ranks."""
        if self.eval_loader is None:
            return {}
        model = self.engine.model.module if hasattr(self.engine.model, "module") else self.engine.model
        model.eval()
        sums: dict[str, list[float]] = {}
        with self.engine.eval_context():
            for batch in self.eval_loader:
                batch = move_to_device(batch, self.device, self.engine.non_blocking)
                pairs = dict(self.task.metrics(model, batch)) if self.task.has_metrics else {}
                if "loss" not in pairs:
                    n = batch_len(batch)
                    pairs["loss"] = (self.task.loss(model, batch).double() * n, n)
                for name, (total, count) in pairs.items():
                    acc = sums.setdefault(name, [0.0, 0.0])
                    acc[0] += torch.as_tensor(total, dtype=torch.float64).item()
                    acc[1] += torch.as_tensor(count, dtype=torch.float64).item()
        # A rank whose shard is empty still joins the reduction with zeros for every name.
        names = sorted(set().union(*dist.all_gather_object(sorted(sums))))
        vector = torch.tensor([v for n in names for v in sums.get(n, [0.0, 0.0])], dtype=torch.float64)
        dist.all_reduce_sum(vector)
        return {n: (vector[2 * i] / vector[2 * i + 1]).item() for i, n in enumerate(names)
                if vector[2 * i + 1] > 0}

    def evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.logger.log({"kind": "eval", "step": self.global_step, "epoch": self.epoch, **metrics})
        return metrics

    # ------------------------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        """Rank 0 creates run_dir and writes config.yaml; the others wait for it."""
        def write() -> None:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(dump_yaml(self.config))
            except OSError as exc:
                raise UsageError(f"run_dir {str(self.run_dir)!r} is not writable: {exc.strerror}") from exc
        dist.on_main(self.env, write)
        dist.barrier()

    def write_outputs(self, summary: dict) -> None:
        """final_model.pt (plain state_dict, no `module.` prefix) and summary.json, atomically."""
        model_path = self.run_dir / "final_model.pt"
        torch.save(self.engine.raw_model.state_dict(), model_path.with_suffix(".tmp"))
        model_path.with_suffix(".tmp").replace(model_path)
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.run_dir / "summary.json")


class _Window:
    """Per-step numbers accumulated on the device between log steps (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.start = time.perf_counter()
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm: torch.Tensor | None = None
        self.steps = 0
        self.data_s = 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.loss_sum += loss
        self.grad_norm = grad_norm
        self.steps += 1
