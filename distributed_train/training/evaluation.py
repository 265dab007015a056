"""Exact evaluation: every eval sample counted once across ranks, (sum, count) pairs summed exactly."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from distributed_train import distributed
from distributed_train.batches import BatchPlan, batch_len, move_to_device
from distributed_train.config import EvalConfig
from distributed_train.engines.base import Engine
from distributed_train.errors import UsageError
from distributed_train.task import Task
from distributed_train.training.data import EvalBatchSampler, eval_subset, make_loader
from distributed_train.training.reporting.metrics import log
from distributed_train.training.reporting.progress import EvalProgress
from distributed_train.training.rng import rng_state, set_rng_state


class Evaluator:
    """This rank's unpadded shard of the eval set and the reduction that makes metrics global."""

    def __init__(self, task: Task, settings: EvalConfig, seed: int, env: distributed.DistEnv,
                 device: torch.device, collate: Any, pin_memory: bool, train_plan: BatchPlan):
        """`eval.*` settings; the eval batch defaults to the training's global batch."""
        self.task, self.env, self.device = task, env, device
        self.every_steps = settings.every_steps
        self.loader = self.filler = None
        self.missing_batches = 0  # this rank's batches fewer than the most any rank has
        eval_set = task.eval_dataset()
        self.size = None if eval_set is None else len(eval_set)
        if eval_set is not None:
            per_rank = max(1, (settings.batch_size or train_plan.global_batch) // env.world_size)
            subset = eval_subset(len(eval_set), settings.max_samples, seed)
            sampler = EvalBatchSampler(len(eval_set), env.rank, env.world_size, per_rank, subset, seed)
            self.loader = make_loader(eval_set, sampler, collate, 0, pin_memory, seed)
            largest_shard = -(-len(subset) // env.world_size)  # unpadded shards differ by at most one sample
            self.missing_batches = -(-largest_shard // per_rank) - len(sampler)
            if len(subset):  # a batch of one eval sample, run and discarded to keep a sharded model's
                # collectives in step where this rank has fewer batches (shards differ by a sample)
                self.filler = make_loader(eval_set, [[subset[0]]], collate, 0, pin_memory, seed)

    def should_evaluate(self, step: int, last_step: bool) -> bool:
        """Every `eval.every_steps` during training; the final evaluation runs after the last step."""
        return bool(self.every_steps) and step % self.every_steps == 0 and not last_step

    def check_methods(self, engine: Engine) -> None:
        """Run the evaluation methods on each rank's first eval batch before training, so that a
        mistake in metrics() is a one-line error now, not a crash after all the training
        (collective: every rank calls it, as a sharded model's forward needs; the RNG states are
        left as they were)."""
        if self.loader is None:  # no eval set: the same on every rank
            return
        cause = self._check_first_batch(engine)
        problems = [p for p in distributed.all_gather_object(cause and str(cause)) if p]
        if problems:  # this rank's own exception stays chained, for --debug
            raise UsageError(problems[0]) from (cause.__cause__ if cause else None)

    @torch.no_grad()
    def _check_first_batch(self, engine: Engine) -> UsageError | None:
        """Why the first eval batch fails on this rank, or None (also when its shard is empty)."""
        model, saved = engine.eval_model(), rng_state()
        was_training = model.training
        model.eval()
        try:
            with engine.autocast():
                # Every rank runs one forward, as a sharded model needs: an empty shard runs the filler.
                batch = next(iter(self.loader), None)
                if batch is None:
                    batch = next(iter(self.filler or ()), None)
                if batch is not None:
                    self.batch_sums(model, self.on_device(batch, engine))
        except UsageError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - the task's code: say which method, in one line
            method = "metrics" if self.task.has_metrics else "loss"
            text = (str(exc).strip().splitlines() or [""])[0]
            problem = UsageError(f"task.{method}() failed on the first eval batch with {type(exc).__name__}: "
                                 f"{text}; fix the task (dtrain train --debug shows the traceback)")
            problem.__cause__ = exc
            return problem
        finally:
            model.train(was_training)
            set_rng_state(saved)
        return None

    @torch.no_grad()
    def evaluate(self, engine: Engine, step: int = 0) -> dict[str, float]:
        """Metrics over the whole eval set (collective: every rank calls it); a long one shows
        rank 0's progress."""
        engine.sync_buffers()  # one model on every rank, also the one final_model.pt holds
        if self.loader is None:
            return {}
        model = engine.eval_model()
        model.eval()
        # (sum, count) per metric, kept on the device: one transfer at the end, not two per batch.
        sums: dict[str, torch.Tensor] = {}
        progress = EvalProgress(step, len(self.loader), self.env.is_main)
        with engine.autocast():
            try:
                for batch in self.loader:
                    batch = self.on_device(batch, engine)
                    for name, pair in self.batch_sums(model, batch).items():
                        sums[name] = sums[name] + pair if name in sums else pair
                    progress.update()
            finally:
                progress.close()
            if engine.eval_in_lockstep:  # each forward is a collective: as many as the busiest rank (not counted)
                for _ in range(self.missing_batches):
                    self.batch_sums(model, self.on_device(next(iter(self.filler)), engine))
        return self.reduce(sums)

    def on_device(self, batch: Any, engine: Engine) -> Any:
        """A batch on the device, as the engine trains on it (float64 under train.precision=fp64)."""
        return move_to_device(batch, self.device, engine.non_blocking, engine.float_dtype)

    def batch_sums(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """One batch's metrics as float64 [sum, count] tensors on the device; loss always included."""
        pairs = dict(self.task.metrics(model, batch)) if self.task.has_metrics else {}
        if "loss" not in pairs:
            loss, count = self.task.loss_terms(model, batch)
            if count is None:  # a mean: the batch weighs as many samples as it holds
                count = batch_len(batch)
                loss = loss.double() * count
            pairs["loss"] = (loss.double(), count)
        return {name: torch.stack([_on_device(name, "sum", total, self.device),
                                   _on_device(name, "count", count, self.device)])
                for name, (total, count) in pairs.items()}

    def reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, float | None]:
        """Sum every rank's pairs; a rank whose shard is empty joins with zeros for every name.
        A metric no sample counted (count 0 on every rank) is None, with a warning, not dropped."""
        names = sorted(set().union(*distributed.all_gather_object(sorted(sums))))
        if not names:
            return {}
        zero = torch.zeros(2, dtype=torch.float64, device=self.device)
        vector = torch.cat([sums.get(name, zero) for name in names])  # on the device, as NCCL needs
        values = distributed.reduce_and_read(vector, "eval metrics")
        metrics = {name: values[2 * i] / values[2 * i + 1] if values[2 * i + 1] > 0 else None
                   for i, name in enumerate(names)}
        empty = [name for name, value in metrics.items() if value is None]
        if empty:
            log.warning("eval metric(s) %s counted no samples (count 0): reported as null",
                        ", ".join(empty))
        return metrics


def _on_device(name: str, part: str, value: Any, device: torch.device) -> torch.Tensor:
    """A float64 0-d tensor on `device`; a Python number is filled in on the device (no host copy).
    Anything but a number or a one-element tensor names the metric (a shape check: no host sync)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.to(device=device, dtype=torch.float64).reshape(())
    if isinstance(value, numbers.Real):  # Python and NumPy numbers
        return torch.full((), float(value), dtype=torch.float64, device=device)
    got = f"a tensor of shape {tuple(value.shape)} (sum it over the batch)" \
        if isinstance(value, torch.Tensor) else f"a {type(value).__name__}: {value!r:.40}"
    raise UsageError(f"task.metrics()[{name!r}] must be (sum, count) of numbers or one-element tensors; "
                     f"its {part} is {got}")
