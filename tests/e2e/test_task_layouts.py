"""The two ways users organise their code train in every process of a job: a task file that imports
a file next to it (`from model import TinyNet`, as nanoGPT's train.py imports model.py), and a
package in a project folder that is not installed. Both under `dtrain launch`, plain `torchrun
launcher/train.py`, `accelerate launch`, and with DataLoader worker processes started by the
default forkserver and by spawn."""

import json
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO, accelerate_launch, clean_env, run_cmd, temp_leftovers, torchrun

pytestmark = pytest.mark.slow

MODEL = """
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x):
        return self.linear(x)
"""

# A Dataset class defined in the task's own module: DataLoader workers started by spawn unpickle it
# by importing that module by name.
DATASET = """
import torch
from torch.utils.data import Dataset


class Points(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = torch.tensor([i / 64, (i % 7) / 7])
        return x, x.sum(0, keepdim=True)
"""

FILE_TASK = DATASET + """
from model import TinyNet  # the file next to this one


class Task:
    criterion = torch.nn.MSELoss()

    def train_dataset(self):
        return Points()

    def model(self):
        return TinyNet()
"""

PACKAGE_TASK = DATASET + """
import torch.nn.functional as F

from mypkg.model import TinyNet


class Task:
    def train_dataset(self):
        return Points()

    def model(self):
        return TinyNet()

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)
"""

JOB = ["--train.batch_size=16", "--train.max_steps=4", "--log.every_steps=2"]
# `dtrain train` in a process whose DataLoader workers start by spawn (the default on macOS; Python
# 3.14 on Linux starts them by forkserver, which imports the same way).
SPAWN = ("import multiprocessing, sys; multiprocessing.set_start_method('spawn'); "
         "from distributed_train.cli import main; sys.exit(main(sys.argv[1:]))")


def write_project(root):
    """root/model.py + root/mytask.py, and the package root/mypkg/{model,tasks}.py."""
    (root / "mypkg").mkdir(parents=True)
    (root / "model.py").write_text(textwrap.dedent(MODEL))
    (root / "mytask.py").write_text(textwrap.dedent(FILE_TASK))
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "model.py").write_text(textwrap.dedent(MODEL))
    (root / "mypkg" / "tasks.py").write_text(textwrap.dedent(PACKAGE_TASK))


def check_trained(run_dir, world_size):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["world_size"] == world_size, summary
    assert summary["train_loss"] == summary["train_loss"] and summary["train_loss"] < 10  # finite
    return summary


def test_both_layouts_train_under_every_launcher(tmp_path):
    project = tmp_path / "project"
    write_project(project)
    # A TMPDIR short enough for the forkserver's socket (a longer one is replaced: test_workers.py)
    scratch = Path(tempfile.mkdtemp(prefix="dtrain-t-"))
    try:
        _train_both_layouts(tmp_path, project, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train_both_layouts(tmp_path, project, scratch):
    # PYTHONPATH holds this repository only: neither layout is importable from it
    env = clean_env(TMPDIR=str(scratch))
    script = shutil.which("dtrain")  # the console script: its folder, not the cwd, is on sys.path
    dtrain_cmd = [script] if script else [sys.executable, "-m", "distributed_train"]

    # A task file given by path from another folder; 2 ranks x 2 DataLoader workers (forkserver).
    proc = run_cmd([*dtrain_cmd, "launch", "--nproc-per-node", "2", "project/mytask.py:Task", *JOB,
                    "--data.num_workers=2", "--run_dir=file-launch"], cwd=tmp_path, env=env)
    check_trained(tmp_path / "file-launch", world_size=2)
    # The workers' queues' semaphores are unlinked by the ranks, not by Python's resource tracker
    # after them (with a warning below the run's last line).
    assert "leaked semaphore" not in proc.stderr, proc.stderr
    assert not temp_leftovers(scratch)  # nor their pymp-* folders (the forkserver's socket)

    # The package, from the project folder, under plain torchrun: the launcher script's folder is
    # on the workers' sys.path, the project folder is not. (`dtrain launch` checks the package in
    # its own process first: tests/unit/test_task_loading.py.)
    torchrun("--standalone", "--nproc-per-node", "2", str(REPO / "launcher" / "train.py"),
             "mypkg.tasks:Task", *JOB, "--run_dir=pkg-torchrun", cwd=project)
    check_trained(project / "pkg-torchrun", world_size=2)

    # The task file under `accelerate launch` (its workers run launcher/train.py).
    accelerate_launch(str(REPO / "launcher" / "train.py"), "project/mytask.py:Task", *JOB, "--engine=accelerate",
                      "--run_dir=file-accelerate", cwd=tmp_path, tmp=tmp_path,
                      env=clean_env(HF_HOME=str(tmp_path / "hf")))
    check_trained(tmp_path / "file-accelerate", world_size=2)

    # A DataLoader worker started by spawn imports the task file's module by its name.
    run_cmd([sys.executable, "-c", SPAWN, "train", "project/mytask.py:Task", *JOB, "--data.num_workers=1",
             "--run_dir=file-spawn"], cwd=tmp_path, env=env)
    check_trained(tmp_path / "file-spawn", world_size=1)
