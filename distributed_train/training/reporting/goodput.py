"""Goodput: the share of a job's wall time that became training progress that survived, over every
attempt on one run directory (torchrun restarts, requeues, a command run again), read back from
metrics.jsonl.

Each attempt's rank 0 writes, in its `start` event, when the attempt began (`attempt_t0`: the
command's start for a first attempt, the process's start for a torchrun restart), how long it took
until the training loop (`startup_s`) and the part of that spent loading the checkpoint
(`restore_s`); every later event carries the loop's running totals (`attempt_s`: data wait,
evaluation, checkpoint stall). Wall time then splits into categories that add up to it:

- productive: loop time of steps whose results survived, less the three below;
- data_wait, evaluation, checkpoint: those parts of the surviving loop time;
- startup: command to the first step, less restore; restore: loading the checkpoint;
- lost: an attempt's time after the last point that the next attempt resumed from (work redone);
- between: from an attempt's last record to the next attempt's start (detecting the failure,
  restarting, waiting in a queue). A killed attempt's time after its last record is unknown and
  counts here: records come at every log, evaluation and checkpoint step. So does the time from
  the command's start (`command_t0`) to the first recorded attempt's start: attempts killed
  before they recorded anything, and their restarts.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from distributed_train.errors import UsageError

CATEGORIES = ("productive", "data_wait", "evaluation", "checkpoint", "startup", "restore", "lost", "between")
LOOP_PARTS = ("data_wait", "evaluation", "checkpoint")
COMMAND_START_ENV = "DTRAIN_COMMAND_T0"  # set by `dtrain launch` for its workers: the command's start


def process_start() -> float:
    """Unix time this process started (Linux: /proc/self/stat, to 10 ms), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def command_start(environ: dict | None = None) -> float | None:
    """The start of the command that runs this attempt (DTRAIN_COMMAND_T0, never after this
    process's start), or None without the variable."""
    environ = os.environ if environ is None else environ
    if COMMAND_START_ENV not in environ:
        return None
    try:
        command = float(environ[COMMAND_START_ENV])
    except ValueError:
        raise UsageError(f"{COMMAND_START_ENV}={environ[COMMAND_START_ENV]!r} is not a Unix time in seconds "
                         "(dtrain launch sets it; unset it)") from None
    return min(command, process_start())


def attempt_start(environ: dict | None = None) -> float:
    """When this attempt began: the command's start (DTRAIN_COMMAND_T0) for a first attempt,
    this process's start for a torchrun restart or without the variable."""
    environ = os.environ if environ is None else environ
    command = command_start(environ)
    if environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or command is None:
        return process_start()
    return command


class AttemptClock:
    """This attempt's running totals, on every rank (rank 0's are logged)."""

    def __init__(self) -> None:
        self.t0 = attempt_start()
        self.command_t0 = command_start()
        self.totals = dict.fromkeys(LOOP_PARTS, 0.0)

    def started(self, restore_s: float) -> dict:
        """The `start` event's fields, when the training loop is about to begin; `command_t0`:
        the command's start (under `dtrain launch`), so a job whose first attempts died before
        recording anything still begins there."""
        command = {"command_t0": round(self.command_t0, 3)} if self.command_t0 is not None else {}
        return {"attempt_t0": round(self.t0, 3), "startup_s": round(max(0.0, time.time() - self.t0), 3),
                "restore_s": round(restore_s, 3), **command}

    def add(self, part: str, seconds: float) -> None:
        self.totals[part] += seconds

    def snapshot(self) -> dict:
        return {k: round(v, 4) for k, v in self.totals.items()}


def read_raw(path: str | Path) -> list[dict]:
    """Every event of metrics.jsonl (a file or its run directory) in file order, with the ones a
    later attempt replaced (the accounting needs what was lost); a line torn by a kill or spoiled
    by a damaged byte is skipped, the rest kept."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    events = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and type(event.get("step")) is int:
            events.append(event)
    return events


def _attempts(events: list[dict]) -> list[list[dict]]:
    """The events split at each `start` event (what comes before the first is no attempt's)."""
    attempts: list[list[dict]] = []
    for event in events:
        if event.get("kind") == "start":
            attempts.append([event])
        elif attempts:
            attempts[-1].append(event)
    return attempts


def breakdown(events: list[dict], now: float | None = None) -> dict | None:
    """The categories in seconds, `wall_s` (their sum), `goodput` (productive / wall) and the
    number of attempts; None without a `start` event. `now` ends the last attempt (default: its
    last record)."""
    attempts = _attempts([e for e in events if isinstance(e.get("time"), (int, float))])
    if not attempts:
        return None
    parts = dict.fromkeys(CATEGORIES, 0.0)
    first = attempts[0][0]
    if isinstance(first.get("command_t0"), (int, float)):  # attempts that died before their `start`
        parts["between"] += max(0.0, float(first.get("attempt_t0", first["time"])) - first["command_t0"])
    for index, attempt in enumerate(attempts):
        start = attempt[0]
        t0 = float(start.get("attempt_t0", start["time"]))
        last = max(now if now is not None and index == len(attempts) - 1 else 0.0, *(e["time"] for e in attempt))
        loop_start = min(last, t0 + float(start.get("startup_s", 0.0)))
        restore = min(float(start.get("restore_s", 0.0)), loop_start - t0)
        parts["restore"] += restore
        parts["startup"] += loop_start - t0 - restore
        resumed_next = attempts[index + 1][0]["step"] if index + 1 < len(attempts) else None
        kept = [e for e in attempt if resumed_next is None or e["step"] <= resumed_next]
        survived = max(kept[-1]["time"], loop_start) if resumed_next is not None else last
        totals = next((e["attempt_s"] for e in reversed(kept) if isinstance(e.get("attempt_s"), dict)), {})
        span = survived - loop_start
        loop_parts = {k: max(0.0, float(totals.get(k, 0.0))) for k in LOOP_PARTS}
        scale = min(1.0, span / sum(loop_parts.values())) if sum(loop_parts.values()) > 0 else 1.0
        for key, seconds in loop_parts.items():
            parts[key] += seconds * scale
        parts["productive"] += span - sum(loop_parts.values()) * scale
        parts["lost"] += last - survived
        if resumed_next is not None:
            following = attempts[index + 1][0]
            parts["between"] += max(0.0, float(following.get("attempt_t0", following["time"])) - last)
    rounded = {k: round(v, 3) for k, v in parts.items()}
    wall = round(sum(rounded.values()), 3)  # the categories add up to it, by construction
    return {**rounded, "wall_s": wall, "goodput": round(rounded["productive"] / wall, 4) if wall > 0 else None,
            "attempts": len(attempts)}


# ---------------------------------------------------------------------------------------------
# The model: Daly's (2006) expected wall time of T_s seconds of work checkpointed every `interval_s`
# of work, each save stalling `stall_s`, failures at exponential times of mean `mtbf_s`, each costing
# `restart_s` (noticing it, restarting, restoring) and the work since the last checkpoint:
#     T_w = M e^{R/M} (e^{(τ+δ)/M} - 1) T_s / τ     goodput = T_s / T_w
# The interval that maximizes it does not depend on R; for δ << M it is Young's sqrt(2 δ M).

def expected_goodput(interval_s: float, stall_s: float, mtbf_s: float, restart_s: float) -> float:
    """The expected share of wall time that is surviving work (Daly's model, above)."""
    x = (interval_s + stall_s) / mtbf_s
    if x > 700:  # e^x overflows: the interval is hopeless against this failure rate
        return 0.0
    return interval_s / (mtbf_s * math.exp(min(restart_s / mtbf_s, 700)) * math.expm1(x))


def optimal_interval(stall_s: float, mtbf_s: float) -> float:
    """The work between checkpoints (seconds) that maximizes `expected_goodput`: the root of
    e^x (1 - τ/M) = 1 with x = (τ + δ)/M, which lies in (0, M)."""
    low, high = 0.0, mtbf_s
    for _ in range(200):
        middle = (low + high) / 2
        if math.exp((middle + stall_s) / mtbf_s) * (1 - middle / mtbf_s) > 1:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def save_cost(interval_s: float, inputs: dict) -> float:
    """What one save costs the training loop (Daly's δ) at `interval_s`: its stall, the CPU time
    of its background write where that comes out of training's own cores (`write_cost_s`: a job
    training on the CPU), and the wait for the previous write when saves come faster than it."""
    return inputs["stall_s"] + inputs.get("write_cost_s", 0.0) + max(0.0, inputs["write_s"] - interval_s)


def goodput_at(interval_s: float, inputs: dict) -> float:
    """Expected goodput checkpointing every `interval_s` of work, `inputs` holding stall_s, write_s,
    mtbf_s, restart_s and optionally write_cost_s (`save_cost`)."""
    return expected_goodput(interval_s, save_cost(interval_s, inputs), inputs["mtbf_s"], inputs["restart_s"])


def best_interval(inputs: dict) -> float:
    """The argmax of `goodput_at` (a log grid, then a golden-section refinement)."""
    low, high = 1e-3, max(1.0, inputs["mtbf_s"])
    grid = [low * (high / low) ** (i / 400) for i in range(401)]
    k = max(range(len(grid)), key=lambda i: goodput_at(grid[i], inputs))
    a, b = grid[max(0, k - 1)], grid[min(len(grid) - 1, k + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        a, b = (a, d) if goodput_at(c, inputs) > goodput_at(d, inputs) else (c, b)
    return (a + b) / 2


def predicted_breakdown(interval_s: float, stall_s: float, mtbf_s: float, restart_s: float) -> dict:
    """Shares of wall time: productive (the goodput), checkpoint stalls, restarts, lost work."""
    productive = expected_goodput(interval_s, stall_s, mtbf_s, restart_s)
    checkpoint = productive * stall_s / interval_s
    restart = min(1.0 - productive - checkpoint, restart_s / mtbf_s)  # failures per wall second x cost
    return {"productive": productive, "checkpoint": checkpoint, "restart": max(0.0, restart),
            "lost": max(0.0, 1.0 - productive - checkpoint - max(0.0, restart))}


def failures_and_time(events: list[dict], now: float) -> tuple[int, float]:
    """Failures in a run directory's history (attempts that ended with neither an `end` event nor a
    stop checkpoint as their last record) and the wall time observed so far, for an MTBF."""
    attempts = _attempts([e for e in events if isinstance(e.get("time"), (int, float))])
    failures = sum(1 for attempt in attempts[:-1] if attempt[-1].get("kind") != "end"
                   and not (attempt[-1].get("kind") == "checkpoint" and attempt[-1].get("on_stop")))
    first = attempts[0][0] if attempts else {"time": now}
    return failures, max(0.0, now - float(first.get("attempt_t0", first["time"])))
