"""The training loop. `Trainer.fit()` reads as prose; the dense work lives in the engine."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_train.training import checkpoint
from distributed_train.dist import diagnose
from distributed_train import dist
from distributed_train.training import flops
from distributed_train.config import Config, dump_yaml, to_dict
from distributed_train.training.data import (BatchPlan, EvalBatchSampler, TrainBatchSampler, batch_len, make_loader,
                   eval_subset, move_to_device)
from distributed_train.engines.ddp import DDPEngine
from distributed_train.errors import NonFiniteLoss, UsageError
from distributed_train.training.metrics import MetricsLogger, log
from distributed_train.dist.preemption import Preempted, StopFlag
from distributed_train.training.profiling import StepProfiler
from distributed_train.task import Task, load_task


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical model init; data order comes from the sampler."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's step: randomness (dropout) depends on (seed, rank, step) only,
    so a resumed run draws exactly what the uninterrupted run drew, even after a SIGTERM save."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def reseed_step(seed: int, rank: int, step: int, device: torch.device) -> None:
    """Seed this rank's generators for `step`. Not torch.manual_seed: it visits every backend
    and costs ~130 us on CPU, 5% of a small model's step; the default generator costs ~1 us."""
    value = step_seed(seed, rank, step)
    torch.default_generator.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.manual_seed(value)  # the current device's generator only


def rng_state() -> dict:
    """This rank's RNG states (torch CPU/CUDA, Python, NumPy) in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


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
    stepped: bool = False  # a step has completed in this process (errors after it are not "first step")
    wandb_id: str | None = None

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
        engine_class = DDPEngine
        if config.engine == "accelerate":  # imported only when asked: accelerate is a heavy import
            from distributed_train.engines.accelerate import AccelerateEngine as engine_class
        self.engine = engine_class(self.task, config, env, device, self.plan, self.total_steps)
        if config.train.nonfinite == "skip" and not hasattr(self.engine, "skipped_steps"):
            raise UsageError(f"train.nonfinite=skip is not implemented by engine={config.engine}; "
                             "use engine=ddp, or train.nonfinite=error")
        self.logger = MetricsLogger(config, env, self.run_dir, self.total_steps)
        self.mfu = flops.MFUMeter(self.task, train_set, collate, device, config.train.precision,
                                  env.world_size, config.log.peak_tflops)
        self.checkpoints = self.run_dir / "checkpoints"
        self.writer = checkpoint.AsyncWriter()
        self.stop = StopFlag(config.checkpoint.on_sigterm)
        self.profiler = StepProfiler(config.train.profile_steps, self.run_dir, env.rank, device)

    def _eval_loader(self, collate: Any, pin: bool) -> Any:
        eval_set = self.task.eval_dataset()
        if eval_set is None:
            return None
        global_batch = self.config.eval.batch_size or self.config.train.batch_size
        per_rank = max(1, global_batch // self.env.world_size)
        subset = eval_subset(len(eval_set), self.config.eval.max_samples, self.config.seed)
        sampler = EvalBatchSampler(len(eval_set), self.env.rank, self.env.world_size, per_rank,
                                   subset, self.config.seed)
        return make_loader(eval_set, sampler, collate, 0, pin, self.config.seed)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to `total_steps`, evaluating and logging on the way; returns the summary."""
        self.prepare_run_dir()
        self.resume()
        self.logger.start(wandb_id=self.wandb_id, resumed_step=self.global_step)
        start = time.perf_counter()
        log.info("training %s: %d steps, global batch %d on %d rank(s) (%d micro-batch(es) of %d per rank)%s",
                 self.task.name, self.total_steps, self.plan.global_batch, self.env.world_size,
                 self.plan.accumulation_steps, self.plan.micro_batch,
                 "; gradients averaged through shared memory" if self.engine.shm_allreduce else "")
        train_time = 0.0
        self.window = _Window(self.device)
        with self.stop:
            try:
                while self.global_step < self.total_steps:
                    epoch_start = time.perf_counter()
                    self.train_epoch()
                    train_time += time.perf_counter() - epoch_start
            except Preempted:
                self.save_on_preemption()
                raise
            except Exception:
                if not self.stop.requested:
                    raise
                # A peer stopped first and our collective failed: keep the last completed step.
                self.save_on_preemption()
                raise Preempted(self.global_step) from None
        if self.config.checkpoint.every_steps and self.global_step % self.config.checkpoint.every_steps:
            self.save_checkpoint()  # so raising train.max_steps later continues from the very end
        self.writer.wait()
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
        # wandb.finish takes a second or two on rank 0: do it before the barrier so all ranks
        # leave (and tear the process group down) together.
        self.logger.close(summary)
        dist.barrier()
        return summary

    def train_epoch(self) -> None:
        """Run the rest of the current epoch (or until total_steps), then advance the epoch."""
        self.train_sampler.set_position(self.epoch, self.step_in_epoch)
        micro_batches = iter(self.train_loader)
        window = self.window
        while self.global_step < self.total_steps:
            diagnose.at("loading batch", step=self.global_step + 1)
            # A mistake in task code or data shows on the first step: one line, not a traceback.
            with diagnose.task_errors_explained(first_step=not self.stepped):
                fetch_start = time.perf_counter()
                batches = [next(micro_batches) for _ in range(self.plan.accumulation_steps)]
                window.data_s += time.perf_counter() - fetch_start
                reseed_step(self.config.seed, self.env.rank, self.global_step, self.device)
                log_step = self.is_log_step(self.global_step + 1)
                # The grad norm costs a pass over the gradients: measured on log steps only.
                loss, grad_norm = self.engine.train_step(batches, measure_grad_norm=log_step)
            self.stepped = True
            self.global_step += 1
            self.step_in_epoch += 1
            self.profiler.step(self.global_step, self.total_steps)
            window.add(loss, grad_norm)
            self.logger.step_done(self.global_step)
            if self.step_in_epoch == self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            if log_step:
                self.log_train(window)
                window = self.window = _Window(self.device)
            if self.config.eval.every_steps and self.global_step % self.config.eval.every_steps == 0 \
                    and self.global_step < self.total_steps:
                self.evaluate_and_log()
            if self.config.checkpoint.every_steps and self.global_step % self.config.checkpoint.every_steps == 0:
                self.save_checkpoint()
            if self.stop.requested:
                raise Preempted(self.global_step)
            if self.step_in_epoch == 0:
                return  # the epoch is complete (the position already points at the next one)

    def log_train(self, window: "_Window") -> None:
        """All-reduce the window's mean loss (the global number, not rank 0's) and log it."""
        elapsed = time.perf_counter() - window.start
        loss = self.window_loss(window)
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
        if self.config.train.nonfinite == "skip":
            event["skipped_steps"] = getattr(self.engine, "skipped_steps", 0)  # since this run started
        if self.task.tokens_per_sample:
            event["tokens_per_s"] = event["samples_per_s"] * self.task.tokens_per_sample
        if self.env.is_main:
            event["mfu"] = self.mfu(event["samples_per_s"])  # None (left out) when not known
        if self.device.type == "cuda":
            event["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)  # per log window
        self.logger.log({k: v for k, v in event.items() if v is not None})

    def window_loss(self, window: "_Window") -> float:
        """The window's global mean loss (one all-reduce). With train.nonfinite=error a NaN/inf loss
        on any rank stops every rank here, naming the first such step and rank; this check runs
        on log steps and before every checkpoint, so a poisoned state is never committed."""
        vector = diagnose.nonfinite_vector(window.losses, self.env.rank, self.env.world_size, self.device)
        dist.all_reduce_sum(vector)
        problem = diagnose.nonfinite_problem(vector, self.global_step - window.steps + 1)
        if problem and self.config.train.nonfinite == "error":
            self.writer.wait()  # the checkpoint in flight is from before the problem: let it commit
            raise NonFiniteLoss(problem)
        total, count = vector[:2].tolist()
        return total / count if count else float("nan")

    def is_log_step(self, step: int) -> bool:
        """Train metrics are reduced and logged after this step (every N, and the last)."""
        return step % self.config.log.every_steps == 0 or step == self.total_steps

    last_train_loss: float | None = None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact metrics over the whole eval set: (sum, count) pairs summed across ranks."""
        self.engine.sync_buffers()  # one model on every rank, also the one final_model.pt holds
        if self.eval_loader is None:
            return {}
        model = self.engine.model.module if hasattr(self.engine.model, "module") else self.engine.model
        model.eval()
        # (sum, count) per metric, kept on the device: one transfer at the end, not two per batch.
        sums: dict[str, torch.Tensor] = {}
        with self.engine.eval_context():
            for batch in self.eval_loader:
                batch = move_to_device(batch, self.device, self.engine.non_blocking)
                pairs = dict(self.task.metrics(model, batch)) if self.task.has_metrics else {}
                if "loss" not in pairs:
                    n = batch_len(batch)
                    pairs["loss"] = (self.task.loss(model, batch).double() * n, n)
                for name, (total, count) in pairs.items():
                    pair = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device)
                                        for v in (total, count)])
                    sums[name] = sums[name] + pair if name in sums else pair
        # A rank whose shard is empty still joins the reduction with zeros for every name.
        names = sorted(set().union(*dist.all_gather_object(sorted(sums))))
        if not names:
            return {}
        zero = torch.zeros(2, dtype=torch.float64, device=self.device)
        vector = torch.cat([sums.get(name, zero) for name in names])  # on the device, as NCCL needs
        values = dist.all_reduce_sum(vector).tolist()
        return {name: values[2 * i] / values[2 * i + 1] for i, name in enumerate(names)
                if values[2 * i + 1] > 0}

    def evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.logger.log({"kind": "eval", "step": self.global_step, "epoch": self.epoch, **metrics})
        return metrics

    # ------------------------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        """Rank 0 creates run_dir and writes config.yaml; an error there stops every rank."""
        def write() -> None:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(dump_yaml(self.config))
            except OSError as exc:
                raise UsageError(f"run_dir {str(self.run_dir)!r} is not writable: {exc.strerror}") from exc
        dist.main_computes(self.env, write)

    def resume(self) -> None:
        """Continue from the checkpoint `checkpoint.resume` selects, if any (every rank loads it)."""
        cfg = self.config.checkpoint
        path = dist.main_computes(self.env, checkpoint.resolve_resume, self.run_dir, cfg.resume, cfg.overwrite)
        if path is None:
            return
        state = checkpoint.load_state(path)
        changed = checkpoint.incompatibilities(state["config"], to_dict(self.config))
        if changed and not cfg.allow_changes:
            raise UsageError(f"checkpoint {path} was written with other settings ({'; '.join(changed)}); "
                             "resume with the same settings, or set checkpoint.allow_changes=true")
        try:
            self.engine.load_state_dict(state["engine"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UsageError(f"checkpoint {path} does not fit this model/optimizer: "
                             f"{str(exc).splitlines()[0]}") from exc
        progress = state["progress"]
        self.global_step, self.epoch = progress["global_step"], progress["epoch"]
        # The data position is world-size free: samples consumed in the epoch. With an unchanged
        # global batch it is a whole number of steps; after an allowed change, round up.
        self.step_in_epoch = -(-progress["samples_in_epoch"] // self.plan.global_batch)
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        rngs = state["rng"]
        if state["world_size"] == self.env.world_size and self.env.rank < len(rngs):
            set_rng_state(rngs[self.env.rank])
        self.wandb_id = state.get("wandb_id")
        self.resumed_from = str(path)
        log.info("resuming from %s (step %d, epoch %d, %d samples into it; written on %d rank(s))",
                 path, self.global_step, self.epoch, progress["samples_in_epoch"], state["world_size"])

    def training_state(self, rngs: list) -> dict:
        """Everything needed to continue exactly; the data position never mentions ranks."""
        return {
            "engine": self.engine.state_dict(),
            "progress": {"global_step": self.global_step, "epoch": self.epoch,
                         "samples_in_epoch": self.step_in_epoch * self.plan.global_batch},
            "rng": rngs,
            "world_size": self.env.world_size,
            "config": to_dict(self.config),
            "wandb_id": self.logger.wandb_id,
        }

    def save_checkpoint(self) -> None:
        """Collective save at a step boundary: gather RNG states, rank 0 commits in the background."""
        start = time.perf_counter()
        if self.window.losses and self.config.train.nonfinite == "error":
            self.window_loss(self.window)  # raises on every rank rather than commit a NaN state
        rngs = dist.all_gather_object(rng_state())
        if self.env.is_main:
            state = checkpoint.to_cpu_copy(self.training_state(rngs))
            self.writer.submit(self.checkpoints, self.global_step, state, self.config.checkpoint.keep_last)
        stall = time.perf_counter() - start
        self.logger.log({"kind": "checkpoint", "step": self.global_step, "stall_s": stall,
                         "previous_write_s": self.writer.last_write_s})

    def save_on_preemption(self) -> None:
        """After SIGTERM: rank 0 commits its local state synchronously; no collectives."""
        self.writer.wait()
        diagnose.at("committing a checkpoint after SIGTERM", may_take_long=True)
        if self.env.is_main and self.global_step > 0 and self.poisoned():
            log.warning("SIGTERM: the loss or the parameters are NaN/inf: no checkpoint committed")
        elif self.env.is_main and self.global_step > 0:
            path = checkpoint.write_checkpoint(self.checkpoints, self.global_step,
                                               self.training_state([rng_state()]))
            checkpoint.rotate(self.checkpoints, self.config.checkpoint.keep_last)
            log.warning("SIGTERM: committed %s; rerun the same command to continue", path)

    def poisoned(self) -> bool:
        """This rank's state holds NaN/inf (a local check, no collective: the SIGTERM path's guard)."""
        losses = self.window.losses if self.config.train.nonfinite == "error" else []
        return any(not torch.isfinite(t).all() for t in [*losses, *self.engine.raw_model.parameters()])

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
        # One 0-d loss tensor per step, summed when logging: no kernel per step, and the first
        # non-finite step can be named (engines return a new tensor each step).
        self.losses: list[torch.Tensor] = []
        self.grad_norm: torch.Tensor | None = None
        self.steps = 0
        self.data_s = 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.losses.append(loss)
        self.grad_norm = grad_norm
        self.steps += 1
