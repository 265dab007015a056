"""Where numbers go: metrics.jsonl, console lines and wandb, all on rank 0 only.

Every rank calls `log()` with the same (already reduced) values; only the main process writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config, to_dict
from .dist import DistEnv

log = logging.getLogger("distributed_train")


def setup_logging(env: DistEnv, debug: bool = False) -> None:
    """Python logging to stderr: rank 0 at INFO, other ranks only warnings, tagged with the rank."""
    level = logging.DEBUG if debug else logging.INFO
    fmt = "%(message)s" if env.rank == 0 else f"[rank {env.rank}] %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    log.handlers[:] = [handler]
    log.setLevel(level if env.rank == 0 else logging.WARNING)
    log.propagate = False


def wandb_mode(requested: str, environ: dict | None = None) -> str:
    """Resolve `log.wandb`: auto -> online with an API key, else offline. Never a login prompt."""
    environ = os.environ if environ is None else environ
    if requested != "auto":
        return requested
    if environ.get("WANDB_MODE") in {"online", "offline", "disabled"}:
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsLogger:
    """Writes log events to run_dir/metrics.jsonl, the console and wandb (main process only)."""

    def __init__(self, config: Config, env: DistEnv, run_dir: Path, total_steps: int):
        self.config, self.env, self.run_dir, self.total_steps = config, env, run_dir, total_steps
        self.wandb_run = None
        self.wandb_id: str | None = None
        self._file = None
        self._last_print = 0.0

    def start(self, wandb_id: str | None = None, resumed_step: int = 0) -> None:
        """Open the JSONL file (append: a resumed run continues it) and wandb."""
        if not self.env.is_main:
            return
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        mode = wandb_mode(self.config.log.wandb)
        if mode != "disabled":
            self._start_wandb(mode, wandb_id)

    def _start_wandb(self, mode: str, wandb_id: str | None) -> None:
        import wandb  # lazy: importing wandb costs ~1 s

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_run = wandb.init(
            project=self.config.log.wandb_project,
            dir=str(self.run_dir),
            mode=mode,
            id=wandb_id,
            resume="allow" if wandb_id else None,
            config={**to_dict(self.config), "world_size": self.env.world_size},
            settings=wandb.Settings(console="off", silent=True),
        )
        self.wandb_id = self.wandb_run.id

    def log(self, event: dict) -> None:
        """Record one event (must contain `step`); prints a line for train and eval events."""
        if not self.env.is_main:
            return
        event = _clean({"time": round(time.time(), 3), **event})
        if self._file:
            self._file.write(json.dumps(event) + "\n")
        if self.wandb_run is not None:
            kind = event.get("kind", "train")
            payload = {f"{kind}/{k}": v for k, v in event.items()
                       if isinstance(v, (int, float)) and k not in {"step", "time"}}
            self.wandb_run.log(payload, step=event["step"])
        self._print(event)

    def _print(self, event: dict) -> None:
        kind = event.get("kind", "train")
        width = len(str(self.total_steps))
        head = f"step {event['step']:>{width}}/{self.total_steps}"
        fields = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in event.items() if k not in {"step", "time", "kind"}]
        log.info("%s %s %s", head, kind, " ".join(fields))

    def close(self, summary: dict | None = None) -> None:
        if not self.env.is_main:
            return
        if self._file:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            if summary:
                self.wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})
            self.wandb_run.finish()
            self.wandb_run = None
