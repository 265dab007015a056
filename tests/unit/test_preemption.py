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


def test_a_stop_signal_this_process_sends_itself_is_refused_where_it_is_sent_and_others_pass():
    """Armed, os.kill/os.killpg/signal.pthread_kill/signal.raise_signal of a stop signal to this
    process raise SignalToItself and send nothing; other signals, other targets and a disarmed
    process go through as before."""
    import os
    import subprocess
    import sys
    import threading

    import pytest

    from distributed_train import errors
    from distributed_train.errors import SignalToItself, refuse_signals_to_self

    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        refuse_signals_to_self()
        sends = [lambda: os.kill(os.getpid(), signal.SIGTERM), lambda: os.kill(0, signal.SIGHUP),
                 lambda: os.killpg(os.getpgrp(), signal.SIGTERM), lambda: signal.raise_signal(signal.SIGHUP),
                 lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)]
        for send in sends:
            with pytest.raises(SignalToItself, match="would send SIG(TERM|HUP) to its own process"):
                send()
        os.kill(os.getpid(), signal.SIGUSR1)  # not a stop signal
        os.kill(child.pid, signal.SIGTERM)  # another process
        assert child.wait(timeout=30) == -signal.SIGTERM
        refuse_signals_to_self(False)
        signal.raise_signal(signal.SIGTERM)
        assert received == [signal.SIGUSR1, signal.SIGTERM]
        assert signal.raise_signal is errors._original_raise_signal  # restored
    finally:
        refuse_signals_to_self(False)
        child.kill()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
