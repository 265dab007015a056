"""Distributed math equals single-process math: the same global batch on 1-4 ranks gives the same
parameters, with and without micro-batches; a model with BatchNorm buffers trains on 2 ranks."""

import json

import pytest
import torch

from distributed_train.cli.train import resolve_config
from distributed_train.distributed import DistEnv
from distributed_train.training.run import run_training
from tests.helpers import EXACT, FP64, REPO, max_diff, run_jobs, run_ranks, train_in_rank

TOY = str(REPO / "tests" / "tasks" / "toy.py")
# 96 samples, global batch 24: 4 steps per epoch, so 6 steps cross an epoch boundary. In float64:
# the results are compared across world sizes (helpers.EXACT).
COMMON = [FP64, "--train.batch_size=24", "--train.max_steps=6", "--train.optimizer=sgd", "--train.lr=0.05",
          "--seed=3", "--log.every_steps=3", "--eval.batch_size=8"]

pytestmark = pytest.mark.distributed


def overrides(run_dir, *extra):
    return [f"--task={TOY}:Regression", *COMMON, f"--run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> (summary, final parameters) for the same job on 1, 2, 3 and 4 ranks."""
    tmp = tmp_path_factory.mktemp("equivalence")
    config = resolve_config(None, ["--log.wandb=disabled", *overrides(tmp / "w1")])
    single = run_training(config, DistEnv())  # one process, no process group
    results = {1: (single, torch.load(single["final_model"], weights_only=True))}
    # Micro-batches + accumulation on 2 ranks (4 x 3 per rank) and on 4 ranks (3 x 2 per rank).
    # Each world size runs both gradient paths: shared memory ("require": never a silent fall
    # back to gloo) and the backend's own all-reduce (DDP's default hook, the path GPUs take).
    for world_size, extra in [(2, ["--train.micro_batch_size=4"]), (3, []),
                              (4, ["--train.micro_batch_size=3"])]:
        jobs = [(world_size, overrides(tmp / f"w{world_size}", *extra, "--ddp.shm_allreduce=require")),
                (f"{world_size}-backend", overrides(tmp / f"w{world_size}-backend", *extra,
                                                    "--ddp.shm_allreduce=never"))]
        results.update({name: (result["summary"], result["state"])
                        for name, result in run_jobs(world_size, jobs).items()})
    return results


@pytest.mark.parametrize("world_size", [2, 3, 4, "2-backend", "3-backend", "4-backend"])
def test_same_parameters_on_any_world_size(runs, world_size):
    reference, state = runs[1][1], runs[world_size][1]
    assert state.keys() == reference.keys() and not any(k.startswith("module.") for k in state)
    worst = max_diff(state, reference)
    assert worst <= EXACT, f"max abs parameter difference {worst:.2e} on {world_size} ranks"


def test_training_moved_the_parameters(runs):
    from tests.tasks.toy import Regression

    torch.manual_seed(3)  # the trainer seeds with `seed` right before building the model
    initial = Regression().model().state_dict()
    trained = runs[1][1]
    assert min((trained[k] - initial[k]).abs().max().item() for k in initial) > 1e-3


@pytest.mark.parametrize("world_size", [2, 3, 4, "2-backend", "3-backend", "4-backend"])
def test_same_loss_and_eval_on_any_world_size(runs, world_size):
    reference, summary = runs[1][0], runs[world_size][0]
    assert summary["world_size"] == int(str(world_size)[0]) and summary["global_step"] == 6
    assert summary["epochs_completed"] == 1
    assert summary["train_loss"] == pytest.approx(reference["train_loss"], rel=EXACT)
    assert summary["eval"].keys() == reference["eval"].keys()
    for name, value in reference["eval"].items():
        assert summary["eval"][name] == pytest.approx(value, rel=EXACT, abs=EXACT), name


def batchnorm_job(rank, world_size, run_dir):
    """Train the BatchNorm task; return the loss curve (rank 0) and this rank's buffers."""
    summary = train_in_rank(rank, world_size, [
        f"--task={TOY}:BatchNormRegression", "--train.batch_size=32", "--train.max_steps=15",
        "--train.lr=0.05", "--log.every_steps=1", f"--run_dir={run_dir}"])["summary"]
    from distributed_train.task import resolve_attr

    model = resolve_attr(f"{TOY}:BatchNormRegression").last_model
    losses = [e["loss"] for e in map(json.loads, open(f"{run_dir}/metrics.jsonl")) if e["kind"] == "train"] \
        if rank == 0 else None
    return {"summary": summary, "losses": losses,
            "buffers": {k: v.clone() for k, v in model.named_buffers()}}


def initial_eval_mse(task_class):
    """Eval mse of the untrained model (the trainer seeds with `seed`=0 before building it)."""
    from tests.tasks.toy import regression_metrics

    task = task_class()
    torch.manual_seed(0)
    model = task.model().eval()
    with torch.no_grad():
        total, count = regression_metrics(model, task.eval_dataset().tensors)["mse"]
    return total.item() / count


def test_batchnorm_model_trains_and_keeps_buffers_in_sync(tmp_path):
    from tests.tasks.toy import BatchNormRegression

    rank0, rank1 = run_ranks(batchnorm_job, 2, str(tmp_path))
    losses = rank0["losses"]
    assert len(losses) == 15
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses
    assert rank0["summary"]["eval"]["mse"] < 0.3 * initial_eval_mse(BatchNormRegression)
    assert rank0["buffers"]["1.num_batches_tracked"].item() == 15
    for name, value in rank0["buffers"].items():
        assert torch.equal(value, rank1["buffers"][name]), f"buffer {name} differs between ranks"
    saved = torch.load(tmp_path / "final_model.pt", weights_only=True)
    for name, value in rank0["buffers"].items():
        assert torch.equal(saved[name], value), f"final_model.pt holds another {name}"
