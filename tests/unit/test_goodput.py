"""Goodput accounting from metrics.jsonl events (distributed_train/training/reporting/goodput.py):
the categories add up to the wall time, work after the point the next attempt resumed from is lost,
gaps between attempts are counted, and a run without the newer fields still adds up."""

import json

import pytest

from distributed_train.errors import UsageError
from distributed_train.training.reporting import goodput
from distributed_train.training.reporting.goodput import CATEGORIES, breakdown, read_raw


def start(t0: float, step: int, startup: float, restore: float = 0.0) -> dict:
    return {"kind": "start", "step": step, "time": t0 + startup, "attempt_t0": t0, "startup_s": startup,
            "restore_s": restore}


def record(kind: str, step: int, time: float, data: float = 0.0, evaluation: float = 0.0,
           checkpoint: float = 0.0) -> dict:
    return {"kind": kind, "step": step, "time": time,
            "attempt_s": {"data_wait": data, "evaluation": evaluation, "checkpoint": checkpoint}}


def assert_adds_up(result: dict) -> None:
    assert sum(result[k] for k in CATEGORIES) == pytest.approx(result["wall_s"], abs=1e-9)
    assert all(result[k] >= 0 for k in CATEGORIES), result


def test_one_attempt_splits_its_wall_time():
    events = [start(100.0, 0, startup=5.0, restore=0.0),
              record("train", 10, 115.0, data=1.0),
              record("checkpoint", 10, 117.0, data=1.0, checkpoint=2.0),
              record("eval", 20, 130.0, data=2.0, evaluation=3.0, checkpoint=2.0)]
    result = breakdown(events)
    assert_adds_up(result)
    assert result["wall_s"] == 30.0 and result["attempts"] == 1
    assert (result["startup"], result["data_wait"], result["evaluation"], result["checkpoint"]) == (5.0, 2.0, 3.0, 2.0)
    assert result["productive"] == 18.0 and result["lost"] == 0 and result["between"] == 0
    assert result["goodput"] == pytest.approx(18.0 / 30.0, abs=1e-4)
    assert breakdown(events, now=140.0)["productive"] == 28.0  # a running attempt ends now


def test_a_killed_attempt_loses_what_followed_the_checkpoint_the_next_one_resumed_from():
    events = [start(0.0, 0, startup=4.0),
              record("checkpoint", 50, 24.0, checkpoint=1.0),
              record("train", 60, 30.0),
              record("train", 70, 34.0),  # killed after this record
              start(40.0, 50, startup=6.0, restore=2.0),  # resumed from step 50
              record("train", 100, 66.0, data=1.0)]
    result = breakdown(events)
    assert_adds_up(result)
    assert result["attempts"] == 2 and result["wall_s"] == 66.0
    assert result["lost"] == 10.0  # 24 -> 34: steps 51-70, redone
    assert result["between"] == 6.0  # 34 -> 40
    assert (result["startup"], result["restore"]) == (4.0 + 4.0, 2.0)
    assert result["checkpoint"] == 1.0 and result["data_wait"] == 1.0
    assert result["productive"] == (24.0 - 4.0 - 1.0) + (66.0 - 46.0 - 1.0)


def test_an_attempt_that_saved_nothing_the_next_one_used_is_all_lost():
    events = [start(0.0, 0, startup=2.0), record("checkpoint", 10, 12.0, checkpoint=1.0),
              start(20.0, 10, startup=2.0),  # resumed from 10, then killed before its checkpoint at 20
              record("train", 15, 30.0),
              start(40.0, 10, startup=2.0),  # resumed from 10 again: attempt 2's loop was all lost
              record("checkpoint", 20, 60.0, checkpoint=1.0)]
    result = breakdown(events)
    assert_adds_up(result)
    assert result["lost"] == 8.0 and result["between"] == 8.0 + 10.0 and result["attempts"] == 3


def test_events_of_older_runs_without_the_fields_still_add_up(tmp_path):
    lines = [{"kind": "start", "step": 0, "time": 10.0}, {"kind": "train", "step": 5, "time": 20.0},
             {"kind": "start", "step": 0, "time": 30.0}, {"kind": "train", "step": 5, "time": 35.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + '\n{"torn')
    result = breakdown(read_raw(tmp_path))
    assert_adds_up(result)
    assert result["lost"] == 10.0 and result["between"] == 10.0 and result["productive"] == 5.0
    assert breakdown([]) is None


def test_the_command_start_is_the_first_attempts_start_and_is_checked(monkeypatch):
    monkeypatch.setattr(goodput, "process_start", lambda: 1000.0)
    assert goodput.attempt_start({"DTRAIN_COMMAND_T0": "990.5"}) == 990.5
    assert goodput.attempt_start({"DTRAIN_COMMAND_T0": "990.5", "TORCHELASTIC_RESTART_COUNT": "1"}) == 1000.0
    assert goodput.attempt_start({}) == 1000.0
    assert goodput.attempt_start({"DTRAIN_COMMAND_T0": "2000"}) == 1000.0  # never after the process
    with pytest.raises(UsageError, match="DTRAIN_COMMAND_T0='soon' is not a Unix time"):
        goodput.attempt_start({"DTRAIN_COMMAND_T0": "soon"})


def test_attempts_that_died_before_recording_count_from_the_command_start(monkeypatch):
    # dtrain launch at 90; its first attempt died before its `start` event; torchrun's restart
    # began at 100 (its own process start) and recorded the command's start beside its own.
    events = [{**start(100.0, 0, startup=4.0), "command_t0": 90.0}, record("train", 10, 120.0),
              {**start(130.0, 10, startup=2.0), "command_t0": 90.0}, record("train", 20, 140.0)]
    result = breakdown(events)
    assert_adds_up(result)
    assert result["wall_s"] == 50.0 and result["between"] == 10.0 + 10.0  # 90 -> 100, then 120 -> 130
    monkeypatch.setattr(goodput, "process_start", lambda: 1000.0)
    assert goodput.command_start({"DTRAIN_COMMAND_T0": "990.5", "TORCHELASTIC_RESTART_COUNT": "3"}) == 990.5
    assert goodput.command_start({}) is None and goodput.command_start({"DTRAIN_COMMAND_T0": "2000"}) == 1000.0


def test_this_process_start_is_in_the_past():
    import time

    assert time.time() - 3600 < goodput.process_start() <= time.time()


def test_the_model_peaks_at_the_optimal_interval_near_youngs():
    import math

    stall, mtbf, restart = 30.0, 3 * 3600.0, 600.0
    best = goodput.optimal_interval(stall, mtbf)
    assert best == pytest.approx(math.sqrt(2 * stall * mtbf), rel=0.05)  # Young's first-order interval
    peak = goodput.expected_goodput(best, stall, mtbf, restart)
    for factor in (0.25, 0.5, 0.9, 1.1, 2.0, 4.0):
        assert goodput.expected_goodput(best * factor, stall, mtbf, restart) < peak
    shares = goodput.predicted_breakdown(best, stall, mtbf, restart)
    assert sum(shares.values()) == pytest.approx(1.0) and shares["productive"] == peak
    assert shares["restart"] == pytest.approx(restart / mtbf) and shares["lost"] > 0


def test_failures_are_attempts_that_ended_without_an_end_or_a_stop_checkpoint():
    events = [start(0.0, 0, startup=1.0), record("train", 10, 10.0),  # killed: a failure
              start(20.0, 0, startup=1.0), {**record("checkpoint", 20, 30.0), "on_stop": True},  # stopped
              start(40.0, 20, startup=1.0), record("train", 30, 50.0)]  # running
    assert goodput.failures_and_time(events, now=60.0) == (1, 60.0)
    assert goodput.failures_and_time([], now=5.0) == (0, 0.0)
