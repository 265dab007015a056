"""The training loop. `Trainer.fit()` reads as prose; the dense work lives in the engine, and each
side job (evaluation, metrics, checkpoints, data position) in a component that decides its own
schedule."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distributed_train import distributed
from distributed_train.batches import BatchPlan
from distributed_train.config import Config, dump_yaml
from distributed_train.distributed import diagnose
from distributed_train.distributed.preemption import Preempted, StopFlag
from distributed_train.engines import build_engine
from distributed_train.engines.base import Engine
from distributed_train.engines.memory import state_bytes_per_rank
from distributed_train.errors import NonFiniteLoss
from distributed_train.storage import is_url
from distributed_train.task import Task, load_task
from distributed_train.training.checkpoints.checkpointer import Checkpointer, Resumed, training_state
from distributed_train.training.data import check_same_sizes
from distributed_train.training.evaluation import Evaluator
from distributed_train.training.iterable import IterableStream
from distributed_train.training.mirror import RunMirror
from distributed_train.training.outputs import RunOutputs
from distributed_train.training.reporting.flops import MFUMeter
from distributed_train.training.reporting.metrics import MetricsLogger, log
from distributed_train.training.reporting.profiling import StepProfiler
from distributed_train.training.reporting.step_metrics import TrainMetrics
from distributed_train.training.rng import reseed_step, seed_everything
from distributed_train.training.run_lock import RunLock
from distributed_train.training.stream import TrainStream, open_train_stream


def default_run_dir(task: str) -> str:
    """runs/<task>-<timestamp> under the working directory."""
    name = Path(task.split(":")[-1]).name if ":" in task else task
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


class Trainer:
    """Owns one training job on one rank: data, engine, logging, evaluation and the run directory."""

    # configuration
    config: Config
    env: distributed.DistEnv
    device: torch.device
    run_dir: Path  # resolved by the caller, identical on every rank; a URL's local working copy
    mirror: RunMirror | None  # with a run_dir URL: the bucket side of the run
    total_steps: int
    # components
    task: Task
    plan: BatchPlan
    data: TrainStream | IterableStream
    engine: Engine
    evaluator: Evaluator
    logger: MetricsLogger
    metrics: TrainMetrics
    checkpointer: Checkpointer
    outputs: RunOutputs
    lock: RunLock  # held while fit() runs
    stop: StopFlag
    profiler: StepProfiler
    # runtime state
    global_step: int  # optimizer steps done, this process and the attempts it resumed
    resumed: Resumed | None  # the checkpoint this process started from
    stepped: bool  # a step completed in this process (later errors are not "first step" mistakes)

    def __init__(self, config: Config, env: distributed.DistEnv, device: torch.device):
        self.config, self.env, self.device = config, env, device
        self.mirror = RunMirror(config.run_dir, env, config.storage) if is_url(config.run_dir) else None
        self.run_dir = self.mirror.local if self.mirror else Path(config.run_dir)
        self.task = load_task(config.task, config)
        self.plan = BatchPlan.make(config.train.batch_size, env.world_size, config.train.micro_batch_size)
        seed_everything(config.seed)
        train_set = self.task.train_dataset()
        pin = config.data.pin_memory if config.data.pin_memory is not None else device.type == "cuda"
        collate = self.task.collate_fn()
        self.data, self.total_steps = open_train_stream(train_set, config, self.plan, env.rank, collate, pin)
        self.evaluator = Evaluator(self.task, config.eval, config.seed, env, device, collate, pin, self.plan)
        check_same_sizes(train_set, self.evaluator.size)  # before the model: a partial copy of the data ends here
        self.engine = build_engine(self.task, config, env, device, self.plan, self.total_steps)
        self.logger = MetricsLogger(config, env, self.run_dir, self.total_steps)
        mfu = MFUMeter(self.task, train_set, collate, device, config.train.precision, env.world_size,
                       config.log.peak_tflops)
        self.metrics = TrainMetrics(config.train, config.log, env, device, self.task, self.logger, mfu)
        self.checkpointer = Checkpointer(config, env, self.run_dir, self.logger, self.engine, self.mirror)
        self.outputs = RunOutputs(env, self.run_dir, self.mirror)
        self.stop = StopFlag(config.checkpoint.on_sigterm, device)
        self.profiler = StepProfiler(config.train.profile_steps, self.run_dir, env.rank, device)
        self.global_step, self.resumed, self.stepped = 0, None, False

    def fit(self) -> dict:
        """Train to `total_steps`, evaluating and logging on the way; returns the summary."""
        start = time.perf_counter()
        with RunLock(self.run_dir, self.env, self.mirror and self.mirror.check_lock) as self.lock, self.outputs:
            self.outputs.prepare(dump_yaml(self.config))
            restore_start = time.perf_counter()
            self.resume()
            self.logger.start(wandb_id=self.resumed and self.resumed.wandb_id, resumed_step=self.global_step,
                              changed=self.resumed.changed if self.resumed else [],
                              state_bytes_per_rank=state_bytes_per_rank(self.engine),
                              **self.logger.clock.started(restore_s=time.perf_counter() - restore_start))
            log.info("training %s: %d steps, global batch %d on %d rank(s) (%d micro-batch(es) of %d per rank)%s",
                     self.task.name, self.total_steps, self.plan.global_batch, self.env.world_size,
                     self.plan.accumulation_steps, self.plan.micro_batch,
                     "; gradients averaged through shared memory" if self.engine.shm_allreduce else "")
            self.evaluator.check_methods(self.engine)  # a metrics() mistake shows now, not after training
            with self.stop:
                train_s = self.train()
            self.lock.verify()  # never a finished job whose outputs went to a deleted folder
            self.outputs.write_model(self.engine)  # first: nothing that runs after the last step can lose it
            try:
                summary = self.summary(self.evaluate(), train_s, time.perf_counter() - start)
                self.outputs.write_summary(summary)
            except Exception as exc:
                self.outputs.write_failed(self.summary({}, train_s, time.perf_counter() - start), exc)
                raise
            # wandb.finish takes a second or two on rank 0: do it before the barrier so all ranks
            # leave (and tear the process group down) together.
            self.logger.close(summary)
            distributed.barrier()
        return summary

    def train(self) -> float:
        """Steps until `total_steps`; returns the seconds it took. SIGTERM or Ctrl-C on any rank
        ends it on every rank after the same step, with a committed checkpoint (Preempted)."""
        start = time.perf_counter()
        try:
            while self.global_step < self.total_steps:
                self.train_step()
                self.after_step()
        except Preempted:
            self.save_on_preemption()
            self.stop.after_commit()  # no rank leaves while rank 0 still writes
            raise
        except NonFiniteLoss:
            self.checkpointer.finish_pending()  # the checkpoint in flight predates the problem
            raise
        except Exception:
            if not self.stop.requested:
                raise
            # A peer stopped first and our collective failed: keep the last completed step.
            self.save_on_preemption(agreed=False)
            raise Preempted(self.global_step, self.stop.stop_signum) from None
        self.checkpointer.finish_pending()
        return time.perf_counter() - start

    def train_step(self) -> None:
        """Fetch the next step's micro-batches and run one optimizer step: the hot path."""
        step = self.global_step + 1
        diagnose.at("loading batch", step=step)
        # A mistake in task code or data shows on the first step: one line, not a traceback.
        with diagnose.task_errors_explained(first_step=not self.stepped):
            fetch_start = time.perf_counter()
            batches = self.data.next_step()
            data_s = time.perf_counter() - fetch_start
            reseed_step(self.config.seed, self.env.rank, self.global_step, self.device)
            # The grad norm costs a pass over the gradients: measured on log steps only.
            loss, grad_norm = self.engine.train_step(batches, measure_grad_norm=self.metrics.should_log(step))
        self.data.advance()
        self.global_step, self.stepped = step, True
        self.metrics.add(loss, grad_norm, data_s)

    def after_step(self) -> None:
        """Log, evaluate, checkpoint and stop where the components' schedules say so."""
        step, last = self.global_step, self.global_step == self.total_steps
        self.profiler.step(step, self.total_steps)
        self.logger.step_done(step)
        if self.metrics.should_log(step):
            self.metrics.log(step, self.data.epoch, self.engine)
        if self.evaluator.should_evaluate(step, last):
            self.evaluate()
        self.checkpointer.check_writes()  # a failed background write stops the run at once
        if self.checkpointer.should_save(step, last, self.stop.take_save()):
            self.lock.verify()  # the folder is still this job's
            self.metrics.check_finite(step)  # never commit a NaN state
            self.checkpointer.save(step, self.state)
        if self.stop.should_stop(step, self.checkpointer.time_due()):  # the same on every rank, same step
            raise Preempted(step, self.stop.stop_signum)

    def evaluate(self) -> dict[str, float]:
        """Exact metrics over the eval set, logged as one `eval` event (collective)."""
        start = time.perf_counter()
        metrics = self.evaluator.evaluate(self.engine, self.global_step)
        self.logger.clock.add("evaluation", time.perf_counter() - start)
        if metrics:
            self.logger.log({"kind": "eval", "step": self.global_step, "epoch": self.data.epoch, **metrics})
        return metrics

    # ------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the checkpoint `checkpoint.resume` selects, if any (every rank loads it)."""
        self.resumed = self.checkpointer.resume(self.engine, self.total_steps)
        if self.resumed is None:
            return
        self.global_step = self.resumed.global_step
        self.data.load_state_dict(self.resumed.position)
        log.info("resuming from %s (step %d, epoch %d, %d samples into it; written on %d rank(s))",
                 self.resumed.path, self.global_step, self.resumed.position["epoch"],
                 self.resumed.position["samples_in_epoch"], self.resumed.world_size)

    def state(self, rngs: list) -> dict:
        """The training state a checkpoint holds, with every rank's RNG states."""
        return training_state(self.engine, self.global_step, self.data.state_dict(), rngs,
                              self.env.world_size, self.config, self.logger.wandb_id)

    def save_on_preemption(self, agreed: bool = True) -> None:
        """After SIGTERM: commit the last completed step, unless rank 0 holds NaN/inf."""
        poisoned = self.env.is_main and self.metrics.poisoned(self.engine)
        self.checkpointer.save_on_preemption(self.global_step, self.state, poisoned, agreed, self.stop.signal_time)

    def summary(self, eval_metrics: dict, train_s: float, wall_s: float) -> dict:
        """summary.json: the contract in the architecture notes."""
        steps_here = self.global_step - (self.resumed.global_step if self.resumed else 0)
        return {
            "global_step": self.global_step,
            "epochs_completed": self.data.epoch,
            "world_size": self.env.world_size,
            "train_loss": self.metrics.last_loss,
            "eval": eval_metrics,
            "samples_per_s": steps_here * self.plan.global_batch / train_s if steps_here and train_s > 0 else None,
            "wall_s": wall_s,
            "final_model": self.outputs.shown_model_path,
            "resumed_from": str(self.resumed.path) if self.resumed else None,
            "goodput": self.logger.goodput(),  # every attempt on this run directory, in seconds
        }
