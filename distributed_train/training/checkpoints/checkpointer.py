"""The checkpoint policy: when to save, what a checkpoint holds, where a run resumes from.

`commit.py` finds, verifies and rotates committed checkpoints and knows nothing about ranks;
`shards.py` writes them. This module decides which rank does what: every rank
gathers its RNG state and writes its shard of model and optimizer in the background; rank 0
writes the rest and commits. Every rank stops after the same step (preemption.StopFlag); then
rank 0 saves alone where it holds the whole model (ddp), and under fsdp the ranks save together.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distributed_train import distributed
from distributed_train.batches import to_cpu_copy
from distributed_train.config import Config, to_dict
from distributed_train.distributed import diagnose
from distributed_train.engines.base import Engine
from distributed_train.errors import UsageError
from distributed_train.storage import StorageError, Store, is_url
from distributed_train.training.checkpoints import commit, remote, shards
from distributed_train.training.checkpoints.schedule import CheckpointSchedule
from distributed_train.training.mirror import RunMirror
from distributed_train.training.reporting.metrics import MetricsLogger, log
from distributed_train.training.rng import rng_state, set_rng_state

# A function of every rank's RNG states that returns the whole training state to save.
StateFn = Callable[[list], dict]


@dataclass
class Resumed:
    """Where a resumed run continues: the checkpoint, its step, data position and wandb run."""

    path: Path | str  # a URL for a checkpoint in object storage
    global_step: int
    position: dict  # {"epoch", "samples_in_epoch"}: world-size free
    wandb_id: str | None
    world_size: int
    changed: list[str]  # `key: saved -> current` for settings changed since the checkpoint (applied)


class Checkpointer:
    """Saves committed checkpoints of one run and finds the one to resume from."""

    def __init__(self, config: Config, env: distributed.DistEnv, run_dir: Path, logger: MetricsLogger, engine: Engine,
                 mirror: RunMirror | None = None):
        self.config, self.env, self.logger, self.engine = config, env, logger, engine
        self.settings = config.checkpoint
        self.directory = run_dir / "checkpoints"  # with a run_dir URL: the local staging folder
        self.run_dir = run_dir
        self.mirror, self.store = mirror, (mirror.store if mirror else None)
        keep = self.settings.keep_last
        rotate = (lambda step: remote.rotate(self.store, keep, step)) if self.store else \
            (lambda step: commit.rotate(self.directory, keep, step))
        self.writer = shards.ShardedWriter(self.directory, env.is_main, rotate, self.store)
        self.sharded = engine.state_is_sharded
        self.schedule = CheckpointSchedule(self.settings, env.is_main, run_dir)
        self.last_stall_s: float | None = None  # this attempt's last save's stall (with the write: its cost)

    def should_save(self, step: int, last_step: bool, timed_due: bool = False) -> bool:
        """Every `checkpoint.every_steps`, when an agreed timed save is due (`timed_due`, the same
        on every rank), and at the last step (so raising train.max_steps later continues from the
        very end): schedule.py."""
        return self.schedule.should_save(step, last_step, timed_due)

    def time_due(self) -> bool | None:
        """This rank's vote for a timed save (None when saves are not timed): schedule.py."""
        return self.schedule.due()

    def save(self, step: int, state: StateFn) -> None:
        """Collective save at a step boundary: every rank stages its share, the write is in the
        background. Logged: `stall_s` (staging: training waits for it), `wait_s` (for the previous
        save's write, still running: 0 when saves are far enough apart), `previous_write_s`, and
        `write_cost_s`: that write's CPU time when training runs on the CPU (it shares the cores)."""
        start = time.perf_counter()
        self.writer.wait()
        waited = time.perf_counter() - start
        rngs = distributed.all_gather_object(rng_state())
        self.engine.sync_buffers()  # the buffers rank 0 holds are the ones every rank continues with
        self.writer.submit(step, self.engine, state(rngs) if self.env.is_main else None)
        stall = self.last_stall_s = time.perf_counter() - start - waited
        self.logger.clock.add("checkpoint", stall + waited)
        write = self.writer.last_write_s
        # Training on the CPU, the background write's CPU time is taken from training's cores.
        cost = self.writer.last_write_cpu_s if self.engine.device.type == "cpu" else 0.0
        self.logger.log({"kind": "checkpoint", "step": step, "stall_s": stall, "wait_s": waited,
                         "previous_write_s": write, "write_cost_s": round(cost, 4),
                         **self.schedule.saved(stall, write, cost)})
        if self.mirror and self.env.is_main:
            self.mirror.upload_metrics_soon()  # the bucket's metrics reach this checkpoint

    def save_on_preemption(self, step: int, state: StateFn, poisoned: bool, agreed: bool = True,
                           signalled_at: float | None = None) -> None:
        """After SIGTERM: rank 0 commits its local state synchronously with no collectives; sharded
        ranks that agreed to stop at this step save together; either only when it is expected to
        fit in checkpoint.grace_s from the signal (`signalled_at`, time.monotonic())."""
        start = time.perf_counter()
        self.writer.wait()
        diagnose.at("committing a checkpoint after SIGTERM", may_take_long=True)
        if step == 0:
            return
        if self.sharded:
            if not agreed:
                log.warning("SIGTERM: a collective failed, so the shards cannot be saved together; "
                            "the job continues from the last committed checkpoint")
                return
            if not distributed.broadcast_object(self._stop_save_wanted(signalled_at)):  # rank 0's answer, everywhere
                return
            rngs = distributed.all_gather_object(rng_state())
            self.writer.submit(step, self.engine, state(rngs) if self.env.is_main else None, blocking=True)
        elif not self.env.is_main:
            return
        elif poisoned:
            log.warning("SIGTERM: the loss or the parameters are NaN/inf: no checkpoint committed")
            return
        elif not self._stop_save_wanted(signalled_at):
            return
        else:
            self.writer.save_alone(step, self.engine, state([rng_state()]))
        if self.env.is_main:
            log.warning("SIGTERM: committed %s; rerun the same command to continue", self.writer.last_committed)
            self.logger.clock.add("checkpoint", time.perf_counter() - start)
            self.logger.log({"kind": "checkpoint", "step": step, "stall_s": time.perf_counter() - start,
                             "on_stop": True})  # the point the next attempt resumes from (goodput)

    def _stop_save_wanted(self, signalled_at: float | None) -> bool:
        """Rank 0's answer: write the stop checkpoint (the run directory is still this job's, and the
        save fits checkpoint.grace_s)."""
        if self.mirror is not None and self.mirror.lock_lost:
            log.warning("SIGTERM: another job took over the lock of %s: no checkpoint committed", self.mirror.url)
            return False
        return self._fits_grace(signalled_at)

    def _fits_grace(self, signalled_at: float | None) -> bool:
        """Whether a stop checkpoint should end within checkpoint.grace_s of the signal, judged by
        this attempt's last save (staging + write; rank 0 alone writes all of it when the state is
        not sharded); without a save to judge by, it is tried. Says why on rank 0 when not."""
        if self.last_stall_s is None:
            return True
        estimate = self.last_stall_s + self.writer.last_write_s * (1 if self.sharded else self.env.world_size)
        left = self.settings.grace_s - (time.monotonic() - signalled_at if signalled_at is not None else 0.0)
        if estimate <= left:
            return True
        if self.env.is_main:
            log.warning("SIGTERM: a checkpoint would take about %.1f s (as this attempt's last save did), more than "
                        "the %.1f s left of checkpoint.grace_s=%g; not saved: the last committed checkpoint (%s) "
                        "stands", estimate, max(0.0, left), self.settings.grace_s,
                        self.writer.last_committed or "none")
        return False

    def check_writes(self) -> None:
        """At a step boundary: raise if a background write has failed (never waits for one)."""
        self.writer.raise_if_failed()

    def finish_pending(self) -> None:
        """Wait for the checkpoint being written; raises if its write failed."""
        self.writer.wait()

    def resume(self, engine: Engine, total_steps: int) -> Resumed | None:
        """Load the checkpoint `checkpoint.resume` selects into `engine` and this rank's RNGs; one
        past this run's `total_steps` is refused (it would rewrite final_model.pt with a longer-trained model)."""
        if self.store and self.settings.resume in ("auto", "never"):
            path, shown = self._download(distributed.main_computes(
                self.env, remote.resolve_resume, self.store, self.settings.resume, self.settings.overwrite))
        else:
            path = shown = distributed.main_computes(self.env, commit.resolve_resume, self.run_dir,
                                                     self.settings.resume, self.settings.overwrite)
        if path is None:
            return None
        state = shards.read_train_state(path)
        check_resumable(shown, state, self.config, total_steps)
        current_groups = hyperparameters(engine.optimizer)
        try:
            shards.load_model_and_optimizer(engine, path)
            engine.load_extra_state(state["engine"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UsageError(f"checkpoint {shown} does not fit this model/optimizer: "
                             f"{str(exc).splitlines()[0]}") from exc
        apply_hyperparameters(engine, current_groups)
        changed = changed_settings(state["config"], to_dict(self.config))
        if changed and self.env.is_main:
            log.warning("resuming with changed settings (applied from step %d on): %s",
                        state["progress"]["global_step"], "; ".join(changed))
        rngs = state["rng"]
        if state["world_size"] == self.env.world_size and self.env.rank < len(rngs):
            set_rng_state(rngs[self.env.rank])
        progress = state["progress"]
        position = {key: value for key, value in progress.items() if key != "global_step"}  # the data stream's
        return Resumed(shown, progress["global_step"], position, state.get("wandb_id"), state["world_size"],
                       changed)


    def _download(self, candidates: list[remote.Remote]) -> tuple[Path | None, str | None]:
        """The newest of the bucket's checkpoints `candidates` that every node downloads whole
        (each node's first rank; every sha256 checked): (local folder, URL), or (None, None) when
        there are none. A damaged one is skipped with a warning, as locally; any other failure, or
        every candidate damaged, stops every rank with one line."""
        for chosen in candidates:
            problem = None
            if self.env.local_rank == 0:
                try:
                    remote.download(self.store, chosen, self.directory)
                except remote.DamagedCheckpoint as exc:
                    problem = ("damaged", str(exc))
                except (StorageError, OSError) as exc:
                    problem = ("failed", f"cannot download checkpoint {chosen.url(self.store)}: {exc}")
            problems = [p for p in distributed.all_gather_object(problem) if p]
            if not problems:
                return self.directory / commit.checkpoint_name(chosen.step), chosen.url(self.store)
            if any(kind == "failed" for kind, _ in problems):
                raise UsageError(next(text for kind, text in problems if kind == "failed"))
            if self.env.is_main:
                log.warning("skipping damaged checkpoint %s: %s", chosen.url(self.store), problems[0][1])
        if candidates:
            raise UsageError(f"run_dir {self.store.url!r} has {len(candidates)} committed checkpoint(s) and none "
                             "downloads whole (every one fails a checksum); restore them, or start over with "
                             "checkpoint.resume=never checkpoint.overwrite=true")
        return None, None


def check_resumable(path: Path | str, state: dict, config: Config, total_steps: int | None) -> None:
    """UsageError if checkpoint `path` (its train_state `state`) cannot continue this run: settings
    that change the math, or a step past the run's `total_steps` (None: not known yet)."""
    changed = commit.incompatibilities(state["config"], to_dict(config))
    if changed and not config.checkpoint.allow_changes:
        raise UsageError(f"checkpoint {path} was written with other settings ({'; '.join(changed)}); "
                         "resume with the same settings, or set checkpoint.allow_changes=true")
    if total_steps is not None and state["progress"]["global_step"] > total_steps:
        raise UsageError(f"checkpoint {path} is at step {state['progress']['global_step']}, past this run's "
                         f"{total_steps} steps: raise train.max_steps to continue, or resume an earlier "
                         "checkpoint (checkpoint.resume=PATH)")


def check_resume_before_start(config: Config) -> None:
    """What the workers' resume would refuse, found by `dtrain launch` before any worker starts:
    checkpoint.resume naming nothing resumable, checkpoints where resume=never, every checkpoint
    damaged, changed settings, a checkpoint past train.max_steps. (Whether the checkpoint fits the
    model is known only once the workers built it.)"""
    if not config.run_dir:
        return  # a new run directory: nothing to resume
    if is_url(config.run_dir) and config.checkpoint.resume in ("auto", "never"):
        _check_remote_resume(config)
        return
    with commit.quietly():  # what it skips (damaged, foreign folders) rank 0 says once, when it resumes
        path = commit.resolve_resume(Path(config.run_dir), config.checkpoint.resume, config.checkpoint.overwrite)
    if path is not None:
        check_resumable(path, shards.read_train_state(path), config, config.train.max_steps)


def _check_remote_resume(config: Config) -> None:
    """check_resume_before_start for a run_dir URL: the bucket answers and takes writes (a missing
    bucket, refused credentials, an unreachable endpoint: one line), and the checkpoint a resume
    would take can continue this run (its train_state.pt alone is read)."""
    try:
        store = Store(config.run_dir)
        store.check_writable()
    except StorageError as exc:
        raise UsageError(f"run_dir {config.run_dir!r}: {exc}") from None
    candidates = remote.resolve_resume(store, config.checkpoint.resume, config.checkpoint.overwrite)
    if not candidates:
        return
    chosen = candidates[0]
    with tempfile.TemporaryDirectory() as folder:
        try:
            store.get_file(f"{remote.PREFIX}/{chosen.folder}/{commit.TRAIN_STATE}", f"{folder}/{commit.TRAIN_STATE}")
        except StorageError as exc:
            raise UsageError(f"run_dir {config.run_dir!r}: {exc}") from None
        check_resumable(chosen.url(store), shards.read_train_state(Path(folder)), config, config.train.max_steps)


# Settings that name the attempt rather than the run: they differ between attempts by design.
_NOT_SETTINGS = {"run_dir", "checkpoint.resume", "checkpoint.overwrite", "checkpoint.allow_changes"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict) and key != "task_args":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every setting that differs from the checkpoint's (applied on
    resume), besides the math-changing ones `checkpoint.incompatibilities` refuses. A key the
    checkpoint's version did not have yet counts as its default there."""
    defaults = _flatten(to_dict(Config()))
    new = _flatten(current)
    old = {key: defaults.get(key) for key in new} | _flatten(saved)
    math = {".".join(key) for key in commit.MATH_KEYS}
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and key not in _NOT_SETTINGS and key not in math]


def hyperparameters(optimizer) -> list[dict]:
    """Every param group's settings (lr, weight decay, betas, ...) without its parameters."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_hyperparameters(engine: Engine, groups: list[dict]) -> None:
    """After loading a checkpoint: the optimizer settings of the current configuration, and the
    learning rate recomputed from it at the resumed step.

    Loading restores the checkpoint's param-group settings and the scheduler's base LRs, which
    would silently keep the old `train.lr` / `train.weight_decay`; the schedule's factor function
    already reads the current config. With unchanged settings this recomputes the same floats."""
    optimizer, scheduler = engine.optimizer, engine.scheduler
    if len(groups) != len(optimizer.param_groups):
        return  # the task's own optimizer changed its groups: the checkpoint's settings stay
    for group, settings in zip(optimizer.param_groups, groups):
        group.update(settings)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    factors = getattr(scheduler, "lr_lambdas", None)
    if factors:
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, factors):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    else:  # the task's own LRScheduler: the learning rate it had reached at the checkpoint
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr


def training_state(engine: Engine, global_step: int, position: dict, rngs: list, world_size: int,
                   config: Config, wandb_id: str | None) -> dict:
    """What rank 0 saves beside the shards; the data position never mentions ranks."""
    return to_cpu_copy({
        "engine": engine.extra_state(),
        "progress": {"global_step": global_step, **position},
        "rng": rngs,
        "world_size": world_size,
        "config": to_dict(config),
        "wandb_id": wandb_id,
    })
