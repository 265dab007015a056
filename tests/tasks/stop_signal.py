"""The toy regression task, plus a signal sent from inside `loss` at a chosen moment.

STOP_TEST_SIGNAL="SIGNAL:TARGET_RANK:SENDER_RANK:CALL" makes rank SENDER_RANK, at its CALL-th
training call of `loss` (1-based, micro-batches count), send SIGNAL to rank TARGET_RANK, whose pid it reads
from STOP_TEST_PIDS/rank-TARGET_RANK. Sent to itself, the signal lands at a known point of the
step; sent to the peer, it lands wherever the peer is (a collective, backward, the optimizer).

Every signal goes through `send`, from another process, as a scheduler's would: a worker refuses a
stop signal that its own task code sends itself (a task failure, not a stop).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.tasks.toy import Regression

SPEC_VAR, PIDS_VAR = "STOP_TEST_SIGNAL", "STOP_TEST_PIDS"


def send(pid: int, signum: int) -> None:
    """Send `signum` to `pid` from a short-lived process of its own; returns once it was sent (so a
    signal to the caller itself is handled before this returns)."""
    subprocess.run([sys.executable, "-c", f"import os; os.kill({pid}, {int(signum)})"], check=True)


class SignalledRegression(Regression):
    """Regression whose loss sends one signal as STOP_TEST_SIGNAL says."""

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = 0

    def loss(self, model, batch):
        if not model.training:  # the start-up check of the eval methods, evaluation: not a step
            return super().loss(model, batch)
        self.calls += 1
        spec = os.environ.get(SPEC_VAR)
        if spec:
            name, target, sender, call = spec.split(":")
            if int(sender) == int(os.environ["RANK"]) and int(call) == self.calls:
                pid = int((Path(os.environ[PIDS_VAR]) / f"rank-{target}").read_text())
                send(pid, getattr(signal, name))
        return super().loss(model, batch)
