"""Tasks that report what a run did from inside it: which samples each step trained on, what a
launched worker's process looked like, and a step that is both NaN and SIGTERMed.

Load by file (`--task=tests/tasks/options_probe.py:SeenSamples`); read back with
`distributed_train.task.resolve_attr` on the same spec (the same module object).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from tests.tasks.stop_signal import send
from tests.tasks.toy import N_TRAIN, Regression, regression_data


def _training(model) -> bool:
    """A training step's loss() call (not the start-up check of the eval methods, not evaluation)."""
    return model.training and torch.is_grad_enabled()


class SeenSamples(Regression):
    """Regression whose training samples carry their index; `seen` gets each training loss()
    call's indices (one list per micro-batch, this process only)."""

    seen: list[list[int]] = []

    def train_dataset(self) -> Dataset:
        x, y = regression_data(N_TRAIN, seed=0)
        return TensorDataset(x, y, torch.arange(N_TRAIN))

    def loss(self, model, batch) -> torch.Tensor:
        if _training(model):
            type(self).seen.append(batch[2].tolist())
        return super().loss(model, batch)


class NaNAndSigterm(Regression):
    """At training loss() call `task_args.step` on rank `task_args.rank`, the loss is NaN and the
    rank sends itself SIGTERM: a stop whose state is poisoned."""

    def __init__(self, config=None):
        super().__init__(config)
        args = dict(getattr(config, "task_args", None) or {})
        self.step, self.rank = args.get("step", 2), args.get("rank", 0)
        self.calls = 0

    def loss(self, model, batch) -> torch.Tensor:
        loss = super().loss(model, batch)
        if _training(model):
            self.calls += 1
            if self.calls == self.step and int(os.environ.get("RANK", "0")) == self.rank:
                send(os.getpid(), signal.SIGTERM)
                return loss * float("nan")
        return loss


def denormals_flushed() -> bool:
    """torch.set_flush_denormal(True) is in effect in this process (its documented check)."""
    return torch.tensor([1e-323], dtype=torch.float64).item() == 0.0


def charlm_probe(config):
    """The built-in charlm task; in a worker (RANK set) it first writes run_dir/probe-rank<R>.json
    with what the worker's process looks like once `run_training` has set it up."""
    from distributed_train.tasks.charlm import CharLMTask

    if "RANK" in os.environ:
        seen = {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
                "denormals_flushed": denormals_flushed()}
        Path(config.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.run_dir) / f"probe-rank{seen['rank']}.json").write_text(json.dumps(seen))
    return CharLMTask(config)
