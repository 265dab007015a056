"""A task written with a criterion trains exactly like the same task written with loss(model, batch):
one process with `loss`, two gloo ranks with `criterion`, same parameters. (Without class weights:
a weighted mean over a micro-batch depends on which samples share it, with `loss` as with
`criterion`; the unit tests compare weighted criteria at one split.)"""

import pytest
import torch

from distributed_train.cli.train import resolve_config
from distributed_train.distributed import DistEnv
from distributed_train.training.run import run_training
from tests.helpers import EXACT, FP64, REPO, max_diff, run_ranks, train_in_rank

TASKS = str(REPO / "tests" / "tasks" / "criterion_tasks.py")
JOB = [FP64, "--train.batch_size=12", "--train.micro_batch_size=3", "--train.max_steps=6", "--train.lr=0.05",
       "--seed=4", "--log.every_steps=3"]

pytestmark = pytest.mark.distributed


def test_criterion_task_on_two_ranks_equals_the_loss_task_in_one_process(tmp_path):
    config = resolve_config(None, [f"--task={TASKS}:PlainLoss", *JOB, f"--run_dir={tmp_path / 'loss'}",
                                   "--log.wandb=disabled"])
    reference = run_training(config, DistEnv())
    expected = torch.load(reference["final_model"], weights_only=True)
    ranks = run_ranks(train_in_rank, 2, [f"--task={TASKS}:PlainCriterion", *JOB,
                                         f"--run_dir={tmp_path / 'criterion'}"])
    summary, state = ranks[0]["summary"], ranks[0]["state"]
    assert summary["global_step"] == 6 and summary["world_size"] == 2
    assert summary["train_loss"] == pytest.approx(reference["train_loss"], rel=EXACT)
    assert summary["eval"] == {} or summary["eval"] == pytest.approx(reference["eval"], rel=EXACT)
    worst = max_diff(state, expected)
    assert worst <= EXACT, f"criterion on 2 ranks differs from loss in 1 process by {worst:.2e}"
