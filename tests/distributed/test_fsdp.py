"""engine=fsdp on real gloo ranks: the same parameters as one process on 1-4 ranks and under HSDP,
BatchNorm buffers as under ddp, activation checkpointing, and sharded checkpoints that resume on
another world size and under another engine. Each spawn runs several jobs one after another."""

import os

import pytest
import torch

from distributed_train.cli.train import resolve_config
from distributed_train.dist import DistEnv
from distributed_train.training.run import run_training
from tests.helpers import REPO, free_port, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

TOY = str(REPO / "tests" / "tasks" / "toy.py")
# Regression: 96 samples, global batch 24, clipping on; 6 steps cross an epoch boundary.
REGRESSION = [f"--task={TOY}:Regression", "--train.batch_size=24", "--train.max_steps=6", "--seed=3",
              "--train.lr=0.05", "--train.grad_clip=0.5", "--log.every_steps=3", "--eval.batch_size=8"]
# A 2-block GPT (the blocks of its ModuleList are the units), AdamW, clipping.
GPT = ["--task=charlm", "--task_args.n_layer=2", "--task_args.d_model=32", "--task_args.n_head=2",
       "--task_args.ctx=16", "--train.batch_size=12", "--train.max_steps=4", "--train.lr=0.01",
       "--train.grad_clip=1.0", "--log.every_steps=2", "--eval.batch_size=64", "--seed=1"]
BATCHNORM = [f"--task={TOY}:BatchNormRegression", "--train.batch_size=32", "--train.max_steps=5",
             "--train.lr=0.05", "--log.every_steps=5", "--train.optimizer=sgd"]  # Adam would amplify the
# rounding noise of the bias before BatchNorm (its true gradient is zero) to whole steps


def single_process(run_dir, overrides) -> dict:
    """Train in this process (no process group); the final parameters."""
    config = resolve_config(None, ["--log.wandb=disabled", *overrides, f"--run_dir={run_dir}"])
    summary = run_training(config, DistEnv())
    return torch.load(summary["final_model"], weights_only=True)


def run_jobs(world_size, jobs):
    """Run each (name, overrides) job in turn on `world_size` ranks: {name: (summary, parameters)}."""
    ports = [free_port() for _ in jobs]  # a fresh rendezvous per job: a reused port can hang
    return run_ranks(jobs_in_rank, world_size, [(*job, port) for job, port in zip(jobs, ports)])[0]


def jobs_in_rank(rank, world_size, jobs):
    """Rank side of `run_jobs`; rank 0 returns the results."""
    out = {}
    for name, overrides, port in jobs:
        os.environ["MASTER_PORT"] = str(port)
        result = train_in_rank(rank, world_size, overrides)
        out[name] = (result["summary"], result["state"])
    return out if rank == 0 else None


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    results = {"single-regression": single_process(tmp / "s1", REGRESSION),
               "single-gpt": single_process(tmp / "s2", GPT),
               "fsdp1-gpt": single_process(tmp / "f1", [*GPT, "--engine=fsdp"])}
    # 2 ranks: accumulation (2 micro-batches of 6), activation checkpointing; BatchNorm under both engines.
    results.update(run_jobs(2, [
        ("fsdp2-gpt", [*GPT, "--engine=fsdp", "--train.micro_batch_size=3", f"--run_dir={tmp}/f2",
                       "--train.activation_checkpointing=units"]),
        ("ddp2-gpt-ac", [*GPT, "--train.activation_checkpointing=units", f"--run_dir={tmp}/d2"]),
        ("fsdp2-bn", [*BATCHNORM, "--engine=fsdp", f"--run_dir={tmp}/f2bn"]),
        ("ddp2-bn", [*BATCHNORM, f"--run_dir={tmp}/d2bn"]),
    ]))
    results.update(run_jobs(3, [
        ("fsdp3-regression", [*REGRESSION, "--engine=fsdp", f"--run_dir={tmp}/f3"]),
        ("fsdp3-gpt", [*GPT, "--engine=fsdp", f"--run_dir={tmp}/f3g"]),
    ]))
    results.update(run_jobs(4, [
        ("fsdp4-regression", [*REGRESSION, "--engine=fsdp", "--train.micro_batch_size=3", f"--run_dir={tmp}/f4"]),
        ("hsdp4-gpt", [*GPT, "--engine=fsdp", "--fsdp.replicate=2", f"--run_dir={tmp}/h4"]),
    ]))
    return results


@pytest.mark.parametrize("name", ["fsdp3-regression", "fsdp4-regression"])
def test_fsdp_regression_matches_one_process(runs, name):
    summary, state = runs[name]
    assert not any(k.startswith(("module.", "_fsdp")) for k in state)
    assert max_diff(state, runs["single-regression"]) <= 1e-5


@pytest.mark.parametrize("name", ["fsdp1-gpt", "fsdp2-gpt", "ddp2-gpt-ac", "fsdp3-gpt", "hsdp4-gpt"])
def test_fsdp_transformer_matches_one_process(runs, name):
    state = runs[name] if isinstance(runs[name], dict) else runs[name][1]
    assert max_diff(state, runs["single-gpt"]) <= 1e-5, name


def test_fsdp_evaluates_like_ddp_and_reports_sharded_state(runs, tmp_path):
    summary, _ = runs["fsdp3-gpt"]
    assert summary["world_size"] == 3 and summary["global_step"] == 4
    assert set(summary["eval"]) >= {"loss", "accuracy"}


def test_batchnorm_buffers_match_ddp(runs):
    fsdp_summary, fsdp_state = runs["fsdp2-bn"]
    ddp_summary, ddp_state = runs["ddp2-bn"]
    assert fsdp_state["1.num_batches_tracked"].item() == 5
    assert max_diff(fsdp_state, ddp_state) <= 1e-5
    assert fsdp_summary["eval"]["mse"] == pytest.approx(ddp_summary["eval"]["mse"], rel=1e-5)
