"""Tasks with one mistake each, for the bad-input matrix (docs/robustness.md).

Load by file: `--task=tests/tasks/broken_tasks.py:NonTensorSamples`. Tasks that misbehave at one
step count their own loss() calls (one per step: no gradient accumulation in these tests) and
read the rank from torchrun's RANK variable; `task_args` choose the step, the rank and the delay.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from tests.tasks.toy import Regression


class _Opaque:
    """A sample type default_collate does not know."""

    def __init__(self, value: float):
        self.value = value


class _OpaqueDataset(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> _Opaque:
        return _Opaque(float(index))


class NonTensorSamples(Regression):
    """train_dataset()[i] is a custom object: the default collate cannot batch it."""

    def train_dataset(self) -> Dataset:
        return _OpaqueDataset()


class ShapeMismatch(Regression):
    """The model expects 3 features, the data has 4: the first forward fails."""

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 1)
        self.unused = nn.Linear(4, 1)  # never called in forward: DDP's classic mistake

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


class UnusedParameter(Regression):
    """A model with a layer that forward() never uses."""

    def model(self) -> nn.Module:
        return _WithUnused()


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 1)
        self.extra = nn.Linear(4, 1)  # a conditional branch (think: an expert the router skipped)

    def forward(self, x: torch.Tensor, take_extra: bool = True) -> torch.Tensor:
        return self.used(x) + self.extra(x) if take_extra else self.used(x)


class ConditionalBranch(Regression):
    """The model's `extra` branch is skipped at step `task_args.step` on rank `task_args.rank`
    (`-1`: every rank); used everywhere else, so the first step passes every check. With
    `task_args.trace=FILE` each training loss() call appends `RANK CALL` to FILE."""

    def __init__(self, config=None):
        super().__init__(config)
        args = dict(getattr(config, "task_args", None) or {})
        self.skip_step, self.skip_rank, self.steps = args.get("step", 3), args.get("rank", 1), 0
        self.trace = args.get("trace")

    def model(self) -> nn.Module:
        return _Branches()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.steps += 1
        rank = int(os.environ.get("RANK", "0"))
        if self.trace and torch.is_grad_enabled():
            with open(self.trace, "a") as f:
                f.write(f"{rank} {self.steps}\n")
        skip = self.steps == self.skip_step and self.skip_rank in (-1, rank) and torch.is_grad_enabled()
        return F.mse_loss(model(batch[0], take_extra=not skip).squeeze(-1), batch[1])


class _StepMisbehaviour(Regression):
    """Misbehaves in loss() at step `task_args.step` on rank `task_args.rank` (default: step 3, rank 1)."""

    def __init__(self, config=None):
        super().__init__(config)
        args = dict(getattr(config, "task_args", None) or {})
        self.bad_step, self.bad_rank = args.get("step", 3), args.get("rank", 1)
        self.extra = args
        self.calls = 0

    last_model: nn.Module | None = None  # this process's model, for tests that compare ranks

    def model(self) -> nn.Module:
        model = super().model()
        type(self).last_model = model
        return model

    def loss(self, model, batch) -> torch.Tensor:
        loss = super().loss(model, batch)
        if torch.is_grad_enabled():  # training steps only, not evaluation
            self.calls += 1
            if self.calls in self.bad_steps() and int(os.environ.get("RANK", "0")) == self.bad_rank:
                return self.misbehave(loss)
        return loss

    def bad_steps(self) -> set[int]:
        return {self.bad_step}

    def misbehave(self, loss: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class NaNLoss(_StepMisbehaviour):
    """The loss is NaN at the chosen step(s) (`task_args.every`: also every N steps after it)."""

    def bad_steps(self) -> set[int]:
        every = self.extra.get("every")
        return set(range(self.bad_step, 10_000, every)) if every else {self.bad_step}

    def misbehave(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan")


class SleepyLoss(_StepMisbehaviour):
    """One rank's loss() sleeps `task_args.sleep_s` (default 60 s): a hung rank."""

    def misbehave(self, loss: torch.Tensor) -> torch.Tensor:
        time.sleep(self.extra.get("sleep_s", 60))
        return loss


class RaisingLoss(_StepMisbehaviour):
    """One rank's loss() raises mid-run: the whole job must stop promptly."""

    def misbehave(self, loss: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("simulated crash in rank's loss()")


class _BadLength(Dataset):
    def __init__(self, length):
        self.length = length

    def __len__(self):
        if isinstance(self.length, Exception):
            raise self.length
        return self.length

    def __getitem__(self, index):
        return torch.zeros(4), torch.zeros(())


class NegativeLength(Regression):
    """A dataset whose __len__ is negative."""

    def train_dataset(self):
        return _BadLength(-1)


class RaisingLength(Regression):
    """A dataset whose __len__ raises (an index file gone)."""

    def train_dataset(self):
        return _BadLength(OSError("the index file is gone"))


class PartialCopy(Regression):
    """Rank `task_args.rank` (default 1) reads a partial copy of the data: its train set is 8
    samples short, or with `task_args.eval_only`, it has no eval set."""

    def __init__(self, config=None):
        super().__init__(config)
        args = dict(getattr(config, "task_args", None) or {})
        self.short = os.environ.get("RANK", "0") == str(args.get("rank", 1))
        self.eval_only = bool(args.get("eval_only", False))

    def train_dataset(self):
        data = super().train_dataset()
        return data if self.eval_only or not self.short else Subset(data, range(len(data) - 8))

    def eval_dataset(self):
        return None if self.eval_only and self.short else super().eval_dataset()


class _OpenFileDataset(Dataset):
    """Holds an open file, as a dataset that opens its shard in __init__ does: it cannot be pickled."""

    def __init__(self):
        self.file = open(__file__, "rb")  # noqa: SIM115 - open for the dataset's life, on purpose

    def __len__(self):
        return 64

    def __getitem__(self, index):
        self.file.seek(index)
        return torch.full((4,), self.file.read(1)[0] / 255), torch.zeros(())


class OpenFileDataset(Regression):
    """train_dataset() holds an open file: workers started by forkserver cannot receive it."""

    def train_dataset(self):
        return _OpenFileDataset()


class SixteenMegabytesOfTensors(Regression):
    """train_dataset() holds 16 MB of tensors: workers started by forkserver get them through /dev/shm."""

    def train_dataset(self):
        from torch.utils.data import TensorDataset

        return TensorDataset(torch.zeros(1_000_000, 4), torch.zeros(1_000_000))
