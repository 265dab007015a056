"""Where numbers go: run_dir/metrics.jsonl, the console and wandb, all from rank 0 only.

Every rank calls `start()`, `log()` and `close()` with the same (already reduced) values; only the
main process writes. metrics.jsonl is append-only: a resumed attempt first writes a `start` event
at its checkpoint step, and `read_events()` drops what a killed attempt logged after that step.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from distributed_train import __version__
from distributed_train.config import Config, to_dict
from distributed_train.distributed import DistEnv, main_computes
from distributed_train.errors import UsageError
from distributed_train.files import error_text, open_no_follow
from distributed_train.training.reporting.goodput import AttemptClock, breakdown, read_raw
from distributed_train.training.reporting.progress import EVENT_FIELDS, Progress, active_bar
from distributed_train.training.reporting.trainjob import TrainJobProgress

log = logging.getLogger("distributed_train")


class _ConsoleHandler(logging.StreamHandler):
    """A stderr handler that writes above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        bar = active_bar()
        if bar is None:
            return super().emit(record)
        try:
            bar.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never kill training
            self.handleError(record)


def setup_logging(env: DistEnv, debug: bool = False) -> None:
    """Python logging to stderr: rank 0 at INFO, other ranks only warnings, tagged with the rank."""
    level = logging.DEBUG if debug else logging.INFO
    fmt = "%(message)s" if env.rank == 0 else f"[rank {env.rank}] %(levelname)s %(message)s"
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    log.handlers[:] = [handler]
    log.setLevel(level if env.rank == 0 else logging.WARNING)
    log.propagate = False


# ---------------------------------------------------------------------------------------------
# wandb mode: decided here, explicitly, because wandb.init without a key and without a mode
# shows a login prompt that blocks forever in a terminal (PITFALLS.md).

def has_wandb_key(environ: Mapping[str, str] | None = None) -> bool:
    """True when wandb would find credentials: WANDB_API_KEY, an identity token or a .netrc entry."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    home = Path(environ.get("HOME") or Path.home())
    candidates = [Path(environ["NETRC"]).expanduser()] if environ.get("NETRC") else \
        [home / ".netrc", home / "_netrc"]
    for path in candidates:
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if entry and entry[2]:
            return True
    return False


def wandb_installed() -> bool:
    """Whether `import wandb` would find the package, without importing it (~1 s). Images built on
    a vendor's base and `pip install --no-deps` (which keeps a cluster's own torch) can lack it."""
    import importlib.util

    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def wandb_mode(requested: str, environ: Mapping[str, str] | None = None, installed: bool | None = None) -> str:
    """Resolve `log.wandb`: auto -> WANDB_MODE if set, online with an API key, else offline; and
    disabled, with a warning, when wandb is not installed (`installed`: None = look)."""
    environ = os.environ if environ is None else environ
    mode = requested
    if requested == "auto":
        if environ.get("WANDB_MODE") in {"online", "offline", "disabled"}:
            mode = environ["WANDB_MODE"]
        else:
            mode = "online" if has_wandb_key(environ) else "offline"
    if mode == "online" and not has_wandb_key(environ):
        raise UsageError("log.wandb=online needs a W&B API key (set WANDB_API_KEY or run `wandb login`); "
                         "use log.wandb=offline and `wandb sync` later, or log.wandb=disabled")
    if mode != "disabled" and not (wandb_installed() if installed is None else installed):
        if requested != "auto":
            raise UsageError(f"log.wandb={requested} needs the wandb package, which is not installed here "
                             "(pip install wandb), or use log.wandb=disabled")
        log.warning("wandb is not installed: every number goes to metrics.jsonl only (pip install wandb "
                    "to log to W&B too)")
        return "disabled"
    return mode


def remove_wandb_temp_folders() -> None:
    """wandb makes two temporary folders when it is imported (media, artifacts) and removes them at
    interpreter exit, which a torchrun worker skips (os._exit): removed here instead, right before.
    Best effort: they are wandb's internals."""
    if "wandb" not in sys.modules:
        return
    import tempfile

    for module, names in (("wandb.sdk.data_types._private", ("MEDIA_TMP",)),
                          ("wandb.sdk.artifacts.artifact", ("Artifact", "_TMP_DIR"))):
        found = sys.modules.get(module)
        for name in names:
            found = getattr(found, name, None)
        if isinstance(found, tempfile.TemporaryDirectory):
            try:
                found.cleanup()
            except OSError:
                pass


def versions() -> dict:
    """Software versions logged with every run."""
    import torch

    return {"distributed_train": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def _last_line_torn(path: Path) -> bool:
    """True when the file ends without a newline (its writer was killed mid-line)."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # missing, or empty (seek before the start)
        return False


def open_for_append(path: Path):
    """metrics.jsonl for appending (line-buffered), never through a planted symbolic link."""
    try:
        fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as exc:
        raise UsageError(f"cannot open {path}: {exc.strerror}") from None
    return os.fdopen(fd, "a", buffering=1)


def read_events(path: str | Path) -> list[dict]:
    """Events of run_dir/metrics.jsonl on the run's final timeline (see the module docstring)."""
    events: list[dict] = []
    for event in read_raw(path):
        if event.get("kind") == "start":
            # A restart from step s replaces everything a previous attempt logged after s. The kept
            # timeline never goes back in step, so those events are at its end: linear in the file.
            while events and (events[-1]["step"] > event["step"] or event["step"] == 0):
                events.pop()
        events.append(event)
    return events


class MetricsLogger:
    """Writes log events to run_dir/metrics.jsonl, the console and wandb (main process only)."""

    def __init__(self, config: Config, env: DistEnv, run_dir: Path, total_steps: int):
        self.config, self.env, self.run_dir, self.total_steps = config, env, Path(run_dir), total_steps
        self.wandb_run = None
        self.wandb_id: str | None = None
        self.progress: Progress | None = None
        self.trainjob: TrainJobProgress | None = None  # posts to a Kubeflow TrainJob's status
        self.clock = AttemptClock()  # this attempt's loop totals, in every later event (goodput)
        self._file = None

    def start(self, wandb_id: str | None = None, resumed_step: int = 0, **start_fields: object) -> None:
        """Open metrics.jsonl (appending) and wandb on rank 0; every rank learns the wandb run id.

        `wandb_id` is the id stored in the checkpoint: a resumed job logs to the same wandb run,
        its steps continuing from `resumed_step`; `start_fields` go into the `start` event (e.g. `changed`:
        the settings that differ from the checkpoint's, `key: old -> new`). Every rank must call this.
        """
        self.wandb_id = main_computes(self.env, self._open, wandb_id, resumed_step, start_fields)

    def _open(self, wandb_id: str | None, resumed_step: int, start_fields: dict) -> str | None:
        mode = wandb_mode(self.config.log.wandb)
        self.wandb_id = wandb_id  # kept through checkpoints even while wandb is off or failing
        path = self.run_dir / "metrics.jsonl"
        torn = _last_line_torn(path)
        self._file = open_for_append(path)
        if torn:
            self._file.write("\n")  # a killed attempt's last line must not swallow our first
        if mode != "disabled":
            self._start_wandb(mode, wandb_id)
        self._write({"kind": "start", "step": resumed_step, "total_steps": self.total_steps,
                     "resumed": resumed_step > 0, "world_size": self.env.world_size,
                     "task": self.config.task, "wandb_id": self.wandb_id, "versions": versions(),
                     **start_fields})
        self.progress = Progress(self.total_steps, resumed_step)
        self.trainjob = TrainJobProgress.from_environ(os.environ, self.total_steps, resumed_step,
                                                      self.config.log.progress_every_s)
        if self.trainjob is not None:
            self.trainjob.start()
        return self.wandb_id

    def _start_wandb(self, mode: str, wandb_id: str | None) -> None:
        import wandb  # lazy: importing wandb costs ~1 s and starts nothing by itself

        os.environ.setdefault("WANDB_SILENT", "true")
        config = {**to_dict(self.config), "world_size": self.env.world_size, "versions": versions()}
        kwargs = dict(project=self.config.log.wandb_project, dir=str(self.run_dir), id=wandb_id,
                      resume="allow" if wandb_id else None, config=config,
                      settings=wandb.Settings(console="off", silent=True, **self._wandb_timeout()))
        (self.run_dir / "wandb").mkdir(exist_ok=True)
        for attempt in [mode, "offline"] if mode == "online" else [mode]:
            try:
                self.wandb_run = wandb.init(mode=attempt, **kwargs)
                break
            except Exception as exc:  # noqa: BLE001 - wandb trouble must not stop training
                log.warning("wandb.init(mode=%s) failed: %s", attempt, (str(exc) or type(exc).__name__).splitlines()[0])
        if self.wandb_run is None:
            log.warning("continuing without wandb; %s/metrics.jsonl has every number", self.run_dir)
            return
        if self.wandb_run.offline and mode == "online":
            log.warning("logging to wandb offline; sync later with `wandb sync %s/wandb/offline-run-*`",
                        self.run_dir)
        self.wandb_id = self.wandb_run.id
        if wandb_id and self.wandb_id != wandb_id:
            log.warning("wandb gave run id %s instead of the checkpoint's %s", self.wandb_id, wandb_id)

    def _wandb_timeout(self) -> dict:
        """Online init waits up to wandb's 90 s for an unreachable server while the other ranks
        wait in a collective: keep it well inside dist.timeout_s (WANDB_INIT_TIMEOUT wins)."""
        if "WANDB_INIT_TIMEOUT" in os.environ:
            return {}
        return {"init_timeout": min(90.0, max(5.0, self.config.dist.timeout_s / 3))}

    def step_done(self, step: int) -> None:
        """Called every step: moves the progress bar (host-side only, no device sync)."""
        if self.progress is not None:
            self.progress.advance(step)
        if self.trainjob is not None:
            self.trainjob.update(step)

    def log(self, event: dict) -> None:
        """Record one event (must contain `step` and `kind`): file, wandb, console."""
        if not self.env.is_main:
            return
        event = self._write(event)
        if self.wandb_run is not None:
            kind = event.get("kind", "train")
            payload = {f"{kind}/{k}": v for k, v in event.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and v is not None and k not in {"step", "time"}}
            self.wandb_run.log(payload, step=event["step"])
        if self.progress is not None:
            self.progress.show(event)
        if self.trainjob is not None:
            self._update_trainjob(event)

    def _update_trainjob(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "train":
            self.trainjob.update(event["step"], event.get("epoch"), train_loss=event.get("loss"))
        elif kind == "eval":
            numbers = {k: v for k, v in event.items() if k not in EVENT_FIELDS
                       and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.trainjob.update(event["step"], event.get("epoch"), eval_metrics=numbers)

    def goodput(self) -> dict | None:
        """The goodput breakdown of every attempt so far, ending now (main process; else None)."""
        if not self.env.is_main or not (self.run_dir / "metrics.jsonl").exists():
            return None
        if self._file:
            self._file.flush()
        return breakdown(read_raw(self.run_dir), now=time.time())

    def _write(self, event: dict) -> dict:
        if event.get("kind") != "start":
            event = {**event, "attempt_s": self.clock.snapshot()}
        event = _clean({"time": round(time.time(), 3), **event})
        if self._file:
            try:
                self._file.write(json.dumps(event) + "\n")
            except OSError as exc:  # a full disk: the log is not worth the run; checkpoints decide
                self._stop_file(exc)
        return event

    def _stop_file(self, exc: OSError) -> None:
        """After a failed write: one warning naming the file and the error, no more writes to it
        (a torn last line is skipped by read_events); training goes on, and a checkpoint that
        cannot be written either stops the job with its own line."""
        log.warning("cannot write %s: %s; later events go to the console%s only", self.run_dir / "metrics.jsonl",
                    error_text(exc), " and wandb" if self.wandb_run else "")
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None

    def close(self, summary: dict | None = None) -> None:
        """Close the file, the progress bar and the wandb run (with the summary) on rank 0."""
        if not self.env.is_main:
            return
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.trainjob is not None:
            self.trainjob.close()  # the last post: 100% when training finished
            self.trainjob = None
        if self._file and summary:
            self._write({"kind": "end", "step": summary["global_step"], "goodput": summary.get("goodput")})
        if self._file:
            try:
                self._file.close()
            except OSError as exc:
                self._stop_file(exc)
            self._file = None
        if self.wandb_run is not None:
            if summary:
                self.wandb_run.summary.update(_clean({k: v for k, v in summary.items() if v is not None}))
            self.wandb_run.finish()
            self.wandb_run = None
