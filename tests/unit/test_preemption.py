"""The stop vote's interval: about VOTE_EVERY_S of steps at this rank's pace, never 0."""

import signal

from distributed_train.distributed import preemption
from distributed_train.distributed.preemption import Preempted, StopFlag


def test_the_vote_interval_follows_the_step_time(monkeypatch):
    clock = iter([64.0, 64.0078125, 64.0078125 + 0.25])  # exact in binary: 10 steps of 0.78 ms, then 250 ms
    monkeypatch.setattr(preemption.time, "perf_counter", lambda: next(clock))
    flag = StopFlag()
    assert flag._propose_interval(1) == 1  # no pace known yet: vote again after one step
    assert flag._propose_interval(11) == 64  # 0.78 ms steps: a vote every 64 (VOTE_EVERY_S = 0.05)
    assert flag._propose_interval(12) == 1  # a 250 ms step: vote on every step


def test_a_single_process_stops_at_once_and_the_exit_code_names_the_signal():
    flag = StopFlag()
    assert not flag.should_stop(1)
    flag._handle(signal.SIGINT, None)
    flag._handle(signal.SIGTERM, None)  # a scheduler's SIGTERM wins over an earlier Ctrl-C
    assert flag.should_stop(2) and flag.stop_signum == signal.SIGTERM
    assert Preempted(2, signal.SIGTERM).exit_code == 143 and Preempted(2, signal.SIGINT).exit_code == 130
    assert not StopFlag(enabled=False).should_stop(1)
