"""When to checkpoint: every N steps (`checkpoint.every_steps`), every N minutes of rank 0's clock
(`checkpoint.every_minutes`), or at the interval that maximizes expected goodput
(`checkpoint.interval=auto`), and at the last step whenever any of them is set.

Time-based saves must happen at the same step on every rank, though the ranks' clocks differ: rank
0's clock says a save is due, the ranks' stop vote (preemption.StopFlag) carries that to every
rank, and every rank saves after the same step (at most a vote, ~0.05 s, later).

`interval=auto` takes a first checkpoint soon after the start to measure the save stall δ, then
saves every τ seconds with τ the argmax of Daly's expected goodput (goodput.best_interval; a save
also waits for the previous background write) for the job's mean time between failures M:
`checkpoint.mtbf_hours`, or learned from this run directory's history (its wall time so far over
its failures, at least one: an estimate that grows as the run survives). τ is chosen again after
every save, from that save's stall.
"""

from __future__ import annotations

import time
from pathlib import Path

from distributed_train.config import CheckpointConfig
from distributed_train.training.reporting import goodput
from distributed_train.training.reporting.metrics import log


class CheckpointSchedule:
    """Decides, per step, whether to save (every rank) and whether a timed save is due (rank 0)."""

    def __init__(self, settings: CheckpointConfig, is_main: bool, run_dir: Path):
        self.settings, self.is_main, self.run_dir = settings, is_main, run_dir
        self.timed = bool(settings.every_minutes) or settings.interval == "auto"
        self.interval_s: float | None = settings.every_minutes * 60 if settings.every_minutes else None
        self.last_save = time.monotonic()
        self.history: tuple[int, float] | None = None  # (failures, first attempt's start) from metrics.jsonl

    def should_save(self, step: int, last_step: bool, timed_due: bool) -> bool:
        """The same answer on every rank: every_steps, an agreed timed save, or the last step."""
        if not self.settings.periodic:
            return False
        every = self.settings.every_steps
        return timed_due or last_step or (bool(every) and step % every == 0)

    def due(self) -> bool | None:
        """This rank's vote for a timed save (rank 0's clock decides); None when saves are not timed."""
        if not self.timed:
            return None
        if not self.is_main:
            return False
        if self.interval_s is None:  # interval=auto before its first save: measure the stall now
            return True
        return time.monotonic() - self.last_save >= self.interval_s

    def saved(self, stall_s: float, write_s: float, write_cost_s: float = 0.0) -> dict:
        """After a save (every rank): restart the clock; with interval=auto choose the next
        interval from this save's stall and the last background write's time (a save waits for
        it) and cost (goodput.save_cost). Returns fields for the checkpoint event."""
        self.last_save = time.monotonic()
        if self.settings.interval != "auto" or not self.is_main:
            return {"interval_s": round(self.interval_s, 3)} if self.interval_s else {}
        mtbf_s, source = self._mtbf()
        inputs = {"stall_s": stall_s, "write_s": write_s, "write_cost_s": write_cost_s, "mtbf_s": mtbf_s,
                  "restart_s": 0.0}
        chosen = goodput.best_interval(inputs)
        if self.interval_s is None or abs(chosen - self.interval_s) > 0.1 * self.interval_s:
            log.info("checkpoint.interval=auto: a checkpoint every %.1f s (save stall %.3f s, write %.2f s costing "
                     "training %.2f s, mean time between failures %.2f h %s; expected goodput from checkpoints and "
                     "failures %.1f%%)", chosen, stall_s, write_s, write_cost_s, mtbf_s / 3600, source,
                     100 * goodput.goodput_at(chosen, inputs))
        self.interval_s = chosen
        return {"interval_s": round(chosen, 3), "mtbf_s": round(mtbf_s, 1)}

    def _mtbf(self) -> tuple[float, str]:
        if self.settings.mtbf_hours:
            return self.settings.mtbf_hours * 3600, "from checkpoint.mtbf_hours"
        now = time.time()
        if self.history is None:
            path = self.run_dir / "metrics.jsonl"
            events = goodput.read_raw(path) if path.exists() else []
            failures, observed = goodput.failures_and_time(events, now)
            self.history = (failures, now - observed)
        failures, first_start = self.history
        observed = max(1.0, now - first_start)
        return observed / max(1, failures), f"learned: {failures} failure(s) in {observed / 3600:.2f} h of this run"
