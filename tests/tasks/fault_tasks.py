"""Tasks with one fault each, for the fault matrix (docs/faults.md).

Load by file: `--task=tests/tasks/fault_tasks.py:PerSampleMetric`.
"""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn

from tests.tasks.toy import Regression, regression_data, regression_metrics


class ExitsInModel(Regression):
    """model() ends the process with exit code 0, as a script's `sys.exit()` left in it would."""

    def model(self):
        raise SystemExit(0)


class Raises(Regression):
    """Raises `task_args.what` (KeyboardInterrupt, SystemExit, MemoryError) in `task_args.where`:
    model, or loss at step `task_args.step` (1-based); or sends a signal to its own process
    (`kill:SIGTERM`, `killpg:SIGINT`, `raise_signal:SIGHUP`, `pthread_kill:SIGTERM`)."""

    def __init__(self, config=None):
        super().__init__(config)
        args = dict(getattr(config, "task_args", None) or {})
        self.what, self.where, self.step = args["what"], args["where"], args.get("step", 1)
        self.losses = 0

    def _raise(self):
        how, _, name = self.what.partition(":")
        if name:
            import signal
            import threading

            signum = getattr(signal, name)
            {"kill": lambda: os.kill(os.getpid(), signum), "killpg": lambda: os.killpg(0, signum),
             "raise_signal": lambda: signal.raise_signal(signum),
             "pthread_kill": lambda: signal.pthread_kill(threading.main_thread().ident, signum)}[how]()
            return
        if self.what == "SystemExit":
            raise SystemExit(0)
        raise {"KeyboardInterrupt": KeyboardInterrupt, "MemoryError": MemoryError}[self.what]()

    def model(self):
        if self.where == "model":
            self._raise()
        return super().model()

    def loss(self, model, batch):
        if torch.is_grad_enabled():  # training, not evaluation
            self.losses += 1
            if self.where == "loss" and self.losses == self.step:
                self._raise()
        return super().loss(model, batch)


class ChangesDirectory(Regression):
    """Changes the working directory to `task_args.to` when it is built, as some scripts do."""

    def __init__(self, config=None):
        super().__init__(config)
        os.chdir(config.task_args["to"])


class Prints(Regression):
    """Prints a line from model(), and one to stderr, as scripts do."""

    def model(self):
        import sys

        print("building the model")
        print("a note on stderr", file=sys.stderr)
        return super().model()


class NoParameters(Regression):
    """A model without parameters: nothing to train."""

    def model(self) -> nn.Module:
        return nn.Tanh()


class FrozenModel(Regression):
    """Every parameter frozen (requires_grad=False)."""

    def model(self) -> nn.Module:
        model = super().model()
        model.requires_grad_(False)
        return model


class PerSampleMetric(Regression):
    """metrics() forgets to sum: a per-sample vector as the metric's sum."""

    def metrics(self, model: nn.Module, batch) -> dict:
        x, y = batch[0], batch[1]
        return {"mse": ((model(x).squeeze(-1) - y) ** 2, len(y))}


class StringMetric(Regression):
    """metrics() returns text where a number belongs."""

    def metrics(self, model: nn.Module, batch) -> dict:
        return {"mse": ("low", len(batch[1]))}


class ZeroCountMetric(Regression):
    """A metric that no eval sample contributes to (count 0): reported, not dropped."""

    def metrics(self, model: nn.Module, batch) -> dict:
        return {**regression_metrics(model, batch), "never": (0.0, 0)}


class FinalEvalFails(Regression):
    """metrics() works on the start-up check but raises in the final evaluation."""

    calls = 0

    def metrics(self, model: nn.Module, batch) -> dict:
        type(self).calls += 1
        if type(self).calls > 1:
            raise RuntimeError("simulated failure in the final evaluation")
        return regression_metrics(model, batch)


class WideModel(Regression):
    """A 4-4096-1 MLP: its checkpoint's shards (96 KiB of parameters, twice that of AdamW state, split
    between the ranks) are a run's largest files, so a file-size limit refuses them alone."""

    def model(self):
        return nn.Sequential(nn.Linear(4, 4096), nn.Tanh(), nn.Linear(4096, 1))


class SlowSteps(Regression):
    """Every training loss() sleeps `task_args.sleep_s` (default 0.2 s): a job that runs a while."""

    def __init__(self, config=None):
        super().__init__(config)
        self.sleep_s = dict(getattr(config, "task_args", None) or {}).get("sleep_s", 0.2)

    def loss(self, model, batch) -> torch.Tensor:
        if torch.is_grad_enabled():
            time.sleep(self.sleep_s)
        return super().loss(model, batch)


class DeletesItsRunDir(Regression):
    """Rank 0 deletes the run directory in training step `task_args.step` (default 3), as an
    `rm -rf` of a running job's folder would."""

    def __init__(self, config=None):
        super().__init__(config)
        self.run_dir, self.calls = config.run_dir, 0
        self.step = dict(config.task_args or {}).get("step", 3)

    def loss(self, model, batch) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.step and int(os.environ.get("RANK", "0")) == 0:
                import shutil

                shutil.rmtree(self.run_dir)
        return super().loss(model, batch)


class StopsItself(Regression):
    """Rank `task_args.rank` gets `task_args.signal` (SIGSTOP, SIGKILL, SIGTERM) at step `task_args.step`,
    sent from another process as a scheduler or the OOM killer would."""

    def __init__(self, config=None):
        super().__init__(config)
        args = dict(getattr(config, "task_args", None) or {})
        self.step, self.rank, self.signal = args.get("step", 3), args.get("rank", 1), args.get("signal", "SIGSTOP")
        self.calls = 0

    def loss(self, model, batch) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.step and int(os.environ.get("RANK", "0")) == self.rank:
                import signal

                from tests.tasks.stop_signal import send
                send(os.getpid(), getattr(signal, self.signal))
        return super().loss(model, batch)


class DiesOnFirstAttempt(Regression):
    """The first attempt of a launch (TORCHELASTIC_RESTART_COUNT 0) spends 1.5 s in model() and
    dies there, before recording anything; torchrun's restart trains."""

    def model(self):
        if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":  # a worker (dtrain launch checks the task too)
            time.sleep(1.5)
            os._exit(1)
        return super().model()


class _KilledInWorker(torch.utils.data.Dataset):
    """Regression samples; DataLoader worker 0 of rank `rank` SIGKILLs itself at its `call`-th
    sample, as the out-of-memory killer ends a worker whose memory grew."""

    def __init__(self, rank: int, call: int):
        self.x, self.y = regression_data(256, seed=0)
        self.rank, self.call, self.calls = rank, call, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.id == 0 and int(os.environ.get("RANK", "0")) == self.rank:
            self.calls += 1
            if self.calls == self.call:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.x[index], self.y[index]


class KillsADataWorker(Regression):
    """With data.num_workers > 0: worker 0 of rank `task_args.rank` (default 1) is killed by
    SIGKILL at its `task_args.call`-th sample (default 40). With `task_args.step_s`, that rank's
    steps take that long each (its loss waits): its workers are ahead of it when one dies."""

    def __init__(self, config=None):
        super().__init__(config)
        args = dict(getattr(config, "task_args", None) or {})
        self.rank, self.call, self.step_s = args.get("rank", 1), args.get("call", 40), args.get("step_s", 0)

    def train_dataset(self):
        return _KilledInWorker(self.rank, self.call)

    def loss(self, model, batch):
        if self.step_s and int(os.environ.get("RANK", "0")) == self.rank:
            time.sleep(self.step_s)
        return super().loss(model, batch)
