"""Stop cleanly on SIGTERM (what Kubernetes and torchrun send before they kill).

The handler only sets a flag: no I/O and no collectives inside a signal handler. The trainer
checks the flag at every step boundary, writes a checkpoint from local state and exits.
"""

from __future__ import annotations

import signal
import threading



class Preempted(Exception):
    """Raised at a step boundary after SIGTERM; carries the step the run stopped at."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM after step {step}")
        self.step = step


class StopFlag:
    """Context manager that turns SIGTERM into `requested = True` while training runs."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def __enter__(self) -> "StopFlag":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
