"""What rank 0 shows on stderr while training: a tqdm bar on a terminal, plain lines otherwise.

Container logs are not terminals: there a bar would print a carriage-return mess, so each log
event becomes one line (`step 20/100 train loss 1.234 ... eta 1m23s`). Other ranks show nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger("distributed_train")

_active_bar: Any = None  # the bar log lines must be written around (see metrics.setup_logging)

# How each field is shown on the console; anything else uses 4 significant digits.
_FORMATS = {
    "loss": "{:.4f}", "lr": "{:.3g}", "samples_per_s": "{:,.0f}", "tokens_per_s": "{:,.0f}",
    "step_time_s": "{:.3g}", "data_wait": "{:.0%}", "mfu": "{:.1%}", "grad_norm": "{:.3g}",
    "peak_mem_gib": "{:.2f}", "accuracy": "{:.4f}", "stall_s": "{:.3f}",
}
_NAMES = {"samples_per_s": "samples/s", "tokens_per_s": "tokens/s", "step_time_s": "step_s",
          "data_wait": "data_wait"}
# Keys of every event that are bookkeeping, not metrics (shown, plotted or listed as numbers).
EVENT_FIELDS = frozenset({"kind", "step", "epoch", "time", "attempt_s"})


def active_bar() -> Any:
    """The tqdm bar currently drawn on stderr, or None."""
    return _active_bar


def format_value(key: str, value: Any) -> str:
    if isinstance(value, float):
        return _FORMATS.get(key, "{:.4g}").format(value)
    return str(value)


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_event(event: dict, total_steps: int, eta_s: float | None = None) -> str:
    """One console line for a log event."""
    width = len(str(total_steps))
    parts = [f"step {event['step']:>{width}}/{total_steps}", event.get("kind", "train")]
    parts += [f"{_NAMES.get(k, k)} {format_value(k, v)}" for k, v in event.items()
              if k not in EVENT_FIELDS and v is not None]
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " ".join(parts)


class Progress:
    """Rank 0's progress display; `advance()` is called every step and costs no host sync."""

    def __init__(self, total_steps: int, start_step: int = 0, tty: bool | None = None,
                 stream: TextIO | None = None):
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.perf_counter()
        self.stream = stream or sys.stderr
        self.bar = None
        if tty if tty is not None else _isatty(self.stream):
            self._open_bar()

    def _open_bar(self) -> None:
        global _active_bar
        from tqdm import tqdm  # lazy: only terminals draw a bar

        self.bar = tqdm(total=self.total_steps, initial=self.start_step, unit="step",
                        file=self.stream, dynamic_ncols=True, smoothing=0.1, leave=True)
        _active_bar = self.bar

    def eta_s(self, step: int) -> float | None:
        """Seconds left at the rate of the steps done since this process started."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * max(0, self.total_steps - step)

    def advance(self, step: int) -> None:
        """The job reached `step` (global)."""
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def show(self, event: dict) -> None:
        """Train events update the bar (or print a line); others print a line above it."""
        kind = event.get("kind", "train")
        if self.bar is not None and kind == "train":
            self.advance(event["step"])
            postfix = {k: format_value(k, event[k]) for k in ("loss", "samples_per_s") if k in event}
            self.bar.set_postfix({_NAMES.get(k, k): v for k, v in postfix.items()}, refresh=True)
            return
        eta = self.eta_s(event["step"]) if kind == "train" else None
        log.info("%s", format_event(event, self.total_steps, eta))

    def close(self) -> None:
        global _active_bar
        if self.bar is not None:
            self.bar.close()
            if _active_bar is self.bar:
                _active_bar = None
            self.bar = None


EVAL_QUIET_S = 10.0  # an evaluation shorter than this shows nothing
EVAL_LINE_EVERY_S = 30.0  # in a log (not a terminal): one line this often while an evaluation runs


class EvalProgress:
    """Rank 0's view of one evaluation that takes long: a bar on a terminal once it has run
    EVAL_QUIET_S, a line every EVAL_LINE_EVERY_S in a log; a short one shows nothing. Counts
    batches on the host: no sync with the device."""

    def __init__(self, step: int, batches: int, enabled: bool, tty: bool | None = None,
                 stream: TextIO | None = None):
        self.step, self.batches, self.done = step, batches, 0
        self.enabled = enabled and batches > 0
        self.stream = stream or sys.stderr
        self.tty = tty if tty is not None else _isatty(self.stream)
        self.started = self.last_line = time.perf_counter()
        self.bar = None

    def update(self) -> None:
        """One more batch evaluated."""
        if not self.enabled:
            return
        self.done += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
        elif self.tty and now - self.started >= EVAL_QUIET_S:
            from tqdm import tqdm

            self.bar = tqdm(total=self.batches, initial=self.done, desc=f"eval at step {self.step}", unit="batch",
                            file=self.stream, dynamic_ncols=True, leave=False)
        elif not self.tty and now - self.last_line >= EVAL_LINE_EVERY_S:
            self.last_line = now
            elapsed = now - self.started
            eta = elapsed / self.done * (self.batches - self.done)
            log.info("step %d eval: %d/%d batches in %s, eta %s", self.step, self.done, self.batches,
                     format_duration(elapsed), format_duration(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
