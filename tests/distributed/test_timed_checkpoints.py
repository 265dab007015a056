"""Checkpoints by time: `checkpoint.every_minutes` and `checkpoint.interval=auto` save at the same
step on every rank (rank 0's clock decides, the ranks' stop vote carries it), at the interval
asked for or the one Daly's model gives for the measured stall; a resume from them is exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distributed_train.training.reporting import goodput
from tests.helpers import EXACT, REPO, fresh_port, max_diff, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

# The regression, 2 ms slower per step on any machine: 300 steps last at least 0.6 s.
TOY = f"--task={REPO / 'tests' / 'tasks' / 'fault_tasks.py'}:SlowSteps"
COMMON = [TOY, "--task_args.sleep_s=0.002", "--train.batch_size=8", "--train.max_steps=300",
          "--train.precision=fp64", "--log.every_steps=50", "--eval.every_steps=0", "--checkpoint.keep_last=2",
          "--dist.timeout_s=20"]


def timed_jobs(rank: int, world_size: int, tmp: str) -> dict:
    out = {}
    for name, extra in (("minutes", ["--checkpoint.every_minutes=0.001"]),  # every 60 ms
                        ("auto", ["--checkpoint.interval=auto", "--checkpoint.mtbf_hours=0.0002"]),
                        ("none", [])):
        os.environ["MASTER_PORT"] = str(fresh_port(rank, Path(tmp), name))  # one store per job
        result = train_in_rank(rank, world_size, [*COMMON, *extra, f"--run_dir={tmp}/{name}"])
        out[name] = result["state"]
    return out


def checkpoint_events(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("kind") == "checkpoint"]


def test_timed_checkpoints_are_taken_together_at_the_interval_and_change_nothing(tmp_path):
    states = run_ranks(timed_jobs, 2, str(tmp_path), timeout=240)[0]
    minutes = checkpoint_events(tmp_path / "minutes")
    assert len(minutes) >= 3, minutes  # a collective save: ranks that disagreed would hang, not finish
    assert all(e["interval_s"] == 0.06 for e in minutes), minutes
    assert [e["step"] for e in minutes] == sorted({e["step"] for e in minutes}) and minutes[-1]["step"] == 300
    assert len(list((tmp_path / "minutes" / "checkpoints").glob("step-*"))) == 2  # rotation as usual

    auto = checkpoint_events(tmp_path / "auto")
    assert len(auto) >= 3 and auto[0]["step"] <= 5, auto  # the first one soon: it measures the stall
    for event in auto:  # each save chooses the next interval from its own stall and the last write
        assert event["mtbf_s"] == 0.7
        # On the CPU the background write's CPU time is a cost to training (it shares the cores).
        assert 0 <= event["write_cost_s"] <= event["previous_write_s"] + 0.01, event
        inputs = {"stall_s": event["stall_s"], "write_s": event["previous_write_s"],
                  "write_cost_s": event["write_cost_s"], "mtbf_s": 0.72, "restart_s": 0}
        assert event["interval_s"] == pytest.approx(goodput.best_interval(inputs), abs=2e-3)
        if event["previous_write_s"] < event["interval_s"]:  # then it is Daly's optimum itself
            cost = event["stall_s"] + event["write_cost_s"]
            assert event["interval_s"] == pytest.approx(goodput.optimal_interval(cost, 0.72), abs=2e-3)
    # Checkpoints by time change no number.
    for name in ("minutes", "auto"):
        assert max_diff(states[name], states["none"]) <= EXACT, name


def test_auto_and_fixed_intervals_cannot_be_mixed():
    from distributed_train.cli.train import resolve_config
    from distributed_train.errors import UsageError

    with pytest.raises(UsageError, match=r"checkpoint.interval=auto chooses the interval itself"):
        resolve_config(None, ["--checkpoint.interval=auto", "--checkpoint.every_steps=10"])
    with pytest.raises(UsageError, match=r"checkpoint.every_minutes must be >= 0"):
        resolve_config(None, ["--checkpoint.every_minutes=-1"])
