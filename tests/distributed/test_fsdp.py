"""engine=fsdp on real gloo ranks: the same parameters as one process on 1-4 ranks and under HSDP,
BatchNorm buffers as under ddp, activation checkpointing, and sharded checkpoints that resume on
another world size and under another engine. Each spawn runs several jobs one after another."""

import pytest
import torch

from distributed_train.cli.train import resolve_config
from distributed_train.distributed import DistEnv
from distributed_train.training.run import run_training
from tests import helpers
from tests.helpers import EXACT, FP64, REPO, max_diff

pytestmark = pytest.mark.distributed

TOY = str(REPO / "tests" / "tasks" / "toy.py")
# Every job trains in float64 (helpers.EXACT): results are compared across world sizes and engines.
# Regression: 96 samples, global batch 24, clipping on; 6 steps cross an epoch boundary.
REGRESSION = [FP64, f"--task={TOY}:Regression", "--train.batch_size=24", "--train.max_steps=6", "--seed=3",
              "--train.lr=0.05", "--train.grad_clip=0.5", "--log.every_steps=3", "--eval.batch_size=8"]
# A 2-block GPT (the blocks of its ModuleList are the units), AdamW, clipping.
GPT = [FP64, "--task=charlm", "--task_args.n_layer=2", "--task_args.d_model=32", "--task_args.n_head=2",
       "--task_args.ctx=16", "--train.batch_size=12", "--train.max_steps=4", "--train.lr=0.01",
       "--train.grad_clip=1.0", "--log.every_steps=2", "--eval.batch_size=64", "--seed=1"]
RANK0_WEIGHTS = [FP64, f"--task={TOY}:PretrainedOnRankZero", "--train.batch_size=32", "--train.max_steps=1",
                 "--train.optimizer=sgd", "--train.lr=1e-3", "--log.every_steps=1"]  # one step: the start shows
BATCHNORM = [FP64, f"--task={TOY}:BatchNormRegression", "--train.batch_size=32", "--train.max_steps=5",
             "--train.lr=0.05", "--log.every_steps=5", "--train.optimizer=sgd"]  # Adam would amplify the
# rounding noise of the bias before BatchNorm (its true gradient is zero) to whole steps


def single_process(run_dir, overrides, summary_too=False):
    """Train in this process (no process group); the final parameters (and the summary)."""
    config = resolve_config(None, ["--log.wandb=disabled", *overrides, f"--run_dir={run_dir}"])
    summary = run_training(config, DistEnv())
    state = torch.load(summary["final_model"], weights_only=True)
    return (summary, state) if summary_too else state


def run_jobs(world_size, jobs):
    """Each (name, overrides) job in turn on `world_size` ranks: {name: (summary, parameters)}."""
    return {name: (r["summary"], r["state"]) for name, r in helpers.run_jobs(world_size, jobs).items()}


# The GPT: its blocks are units, whose every forward all-gathers (the root keeps its parameters
# gathered after a forward, so a root-only model would need no filler forward).
UNEVEN_EVAL = [*GPT, "--eval.max_samples=9", "--eval.batch_size=8", "--train.max_steps=2"]
# Resume: a 4-rank fsdp run of 12 steps with checkpoints at 4, 8 and 12 is the reference.
RESUME = [*REGRESSION, "--train.max_steps=12", "--checkpoint.every_steps=4", "--checkpoint.keep_last=3",
          "--train.grad_clip=0"]


def from_checkpoint(run_dir, step):
    return f"--checkpoint.resume={run_dir}/checkpoints/step-{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    results = {}
    # 4 ranks: micro-batches; HSDP 2x2; the resume reference and its same-world-size resume.
    results.update(run_jobs(4, [
        # 9 eval samples, 2 per rank and batch: rank 3 has 2 batches, the others 1 (a hang without
        # the filler forwards, until dist.timeout_s; first, so that the mechanism-removal check
        # waits for nothing else)
        ("fsdp4-uneven-eval", [*UNEVEN_EVAL, "--engine=fsdp", "--dist.timeout_s=20", f"--run_dir={tmp}/f4e"]),
        ("fsdp4-regression", [*REGRESSION, "--engine=fsdp", "--train.micro_batch_size=3", f"--run_dir={tmp}/f4"]),
        ("hsdp4-gpt", [*GPT, "--engine=fsdp", "--fsdp.replicate=2", f"--run_dir={tmp}/h4"]),
        ("ref4", [*RESUME, "--engine=fsdp", f"--run_dir={tmp}/ref4"]),
        ("same4", [*RESUME, "--engine=fsdp", f"--run_dir={tmp}/same4", from_checkpoint(tmp / "ref4", 4)]),
    ]))
    # 2 ranks: accumulation and activation checkpointing; BatchNorm under both engines; 4 -> 2,
    # fsdp -> ddp, and a ddp checkpoint for ddp -> fsdp.
    results.update(run_jobs(2, [
        ("fsdp2-gpt", [*GPT, "--engine=fsdp", "--train.micro_batch_size=3", f"--run_dir={tmp}/f2",
                       "--train.activation_checkpointing=units"]),
        ("ddp2-gpt-ac", [*GPT, "--train.activation_checkpointing=units", f"--run_dir={tmp}/d2"]),
        ("fsdp2-bn", [*BATCHNORM, "--engine=fsdp", f"--run_dir={tmp}/f2bn"]),
        ("ddp2-bn", [*BATCHNORM, f"--run_dir={tmp}/d2bn"]),
        ("4to2", [*RESUME, "--engine=fsdp", f"--run_dir={tmp}/4to2", from_checkpoint(tmp / "ref4", 4)]),
        ("fsdp-to-ddp", [*RESUME, f"--run_dir={tmp}/f2d", from_checkpoint(tmp / "ref4", 8)]),
        ("ddp4steps", [*RESUME, "--train.max_steps=4", f"--run_dir={tmp}/ddp4"]),
        ("fsdp2-rank0-weights", [*RANK0_WEIGHTS, "--engine=fsdp", f"--run_dir={tmp}/f2w"]),
        ("ddp2-rank0-weights", [*RANK0_WEIGHTS, f"--run_dir={tmp}/d2w"]),
    ]))
    # 3 ranks: uneven shards (the GPT); 4 -> 3 (writes step 8 for 3 -> 1) and ddp -> fsdp.
    results.update(run_jobs(3, [
        ("fsdp3-gpt", [*GPT, "--engine=fsdp", f"--run_dir={tmp}/f3g"]),
        ("4to3", [*RESUME, "--engine=fsdp", f"--run_dir={tmp}/4to3", from_checkpoint(tmp / "ref4", 4)]),
        ("ddp-to-fsdp", [*RESUME, "--engine=fsdp", f"--run_dir={tmp}/d2f", from_checkpoint(tmp / "ddp4", 4)]),
    ]))
    results.update({"single-regression": single_process(tmp / "s1", REGRESSION),
                    "single-gpt": single_process(tmp / "s2", GPT),
                    "single-uneven-eval": single_process(tmp / "s3", UNEVEN_EVAL, summary_too=True),
                    "single-rank0-weights": single_process(tmp / "s4", RANK0_WEIGHTS),
                    "fsdp1-gpt": single_process(tmp / "f1", [*GPT, "--engine=fsdp"]),
                    "3to1": single_process(tmp / "3to1", [*RESUME, "--engine=fsdp", from_checkpoint(tmp / "4to3", 8)]),
                    "tmp": tmp})
    return results


def test_fsdp_regression_matches_one_process(runs, name="fsdp4-regression"):
    summary, state = runs[name]
    assert not any(k.startswith(("module.", "_fsdp")) for k in state)
    assert max_diff(state, runs["single-regression"]) <= EXACT


@pytest.mark.parametrize("name", ["fsdp1-gpt", "fsdp2-gpt", "ddp2-gpt-ac", "fsdp3-gpt", "hsdp4-gpt"])
def test_fsdp_transformer_matches_one_process(runs, name):
    state = runs[name] if isinstance(runs[name], dict) else runs[name][1]
    assert max_diff(state, runs["single-gpt"]) <= EXACT, name


def test_fsdp_evaluates_like_ddp_and_reports_sharded_state(runs, tmp_path):
    summary, _ = runs["fsdp3-gpt"]
    assert summary["world_size"] == 3 and summary["global_step"] == 4
    assert set(summary["eval"]) >= {"loss", "accuracy"}


def test_ranks_with_fewer_eval_batches_keep_in_step_and_the_metrics_stay_exact(runs):
    # Each eval forward of a sharded model is a collective: ranks 0-2 run a discarded forward
    # while rank 3 evaluates its second batch; every sample still counts once.
    (summary, state), (reference, reference_state) = runs["fsdp4-uneven-eval"], runs["single-uneven-eval"]
    assert max_diff(state, reference_state) <= EXACT
    assert summary["eval"].keys() == reference["eval"].keys() and reference["eval"]
    for name, value in reference["eval"].items():
        assert summary["eval"][name] == pytest.approx(value, rel=EXACT, abs=EXACT), name


def test_batchnorm_buffers_match_ddp(runs):
    fsdp_summary, fsdp_state = runs["fsdp2-bn"]
    ddp_summary, ddp_state = runs["ddp2-bn"]
    assert fsdp_state["1.num_batches_tracked"].item() == 5
    assert max_diff(fsdp_state, ddp_state) <= EXACT
    assert fsdp_summary["eval"]["mse"] == pytest.approx(ddp_summary["eval"]["mse"], rel=EXACT)


def test_every_rank_starts_from_rank_0s_model(runs):
    """A task that loads its weights on rank 0 only (the other ranks hold a random start): fsdp
    shards rank 0's model, as DDP broadcasts it, not a mix of every rank's own."""
    fsdp, ddp = runs["fsdp2-rank0-weights"][1], runs["ddp2-rank0-weights"][1]
    assert max_diff(fsdp, ddp) <= EXACT
    # One step of lr 1e-3 from rank 0's start; the starts differ by ~1 (BatchNorm's running
    # statistics moved with each rank's own batch: parameters only).
    alone = runs["single-rank0-weights"]
    weights = [k for k in alone if k.endswith(("weight", "bias"))]
    assert max_diff({k: fsdp[k] for k in weights}, {k: alone[k] for k in weights}) <= 1e-3


def test_resume_on_the_same_world_size_is_bit_identical(runs):
    reference, same = runs["ref4"][1], runs["same4"][1]
    assert runs["same4"][0]["resumed_from"].endswith("step-00000004")
    assert all(torch.equal(same[k], reference[k]) for k in reference)


@pytest.mark.parametrize("name", ["4to2", "4to3", "3to1", "fsdp-to-ddp", "ddp-to-fsdp"])
def test_resume_on_other_world_sizes_and_engines(runs, name):
    state = runs[name] if isinstance(runs[name], dict) else runs[name][1]
    assert max_diff(state, runs["ref4"][1]) <= EXACT, name


def test_sharded_checkpoint_layout_and_export(runs, tmp_path):
    from distributed_train.cli import export
    from distributed_train.training.checkpoints.commit import verify

    step = runs["tmp"] / "ref4" / "checkpoints" / "step-00000012"
    assert {p.name for p in step.iterdir()} == {".metadata", "COMMITTED", "train_state.pt",
                                                 *(f"__{r}_0.distcp" for r in range(4))}
    assert verify(step) is None
    assert export.main([str(runs["tmp"] / "ref4"), "-o", str(tmp_path / "model.pt")]) == 0
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    final = torch.load(runs["tmp"] / "ref4" / "final_model.pt", weights_only=True)
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_state_bytes_per_rank_is_sharded_and_estimated(runs):
    import json

    from distributed_train.cli.estimate import in_precision, model_summary
    from distributed_train.engines.memory import predicted_state_bytes
    from distributed_train.task import load_task

    def measured(run):
        events = [json.loads(line) for line in open(runs["tmp"] / run / "metrics.jsonl")]
        return next(e for e in events if e["kind"] == "start")["state_bytes_per_rank"]

    ddp, fsdp = measured("d2"), measured("f2")  # the same GPT on 2 ranks
    config = resolve_config(None, GPT)
    model, slots, units = model_summary(load_task(config.task, config), config)
    model = in_precision(model, "fp64")  # as `dtrain estimate` sizes the state of an fp64 job
    largest_unit = max(sum(p.numel() for p in u.parameters()) for u in units) * 8 * (2 + slots)
    assert fsdp <= ddp / 2 + largest_unit
    for run, shards in (("d2", 1), ("f2", 2), ("f3g", 3)):
        predicted = sum(predicted_state_bytes(model, slots, shards).values())
        assert abs(predicted - measured(run)) <= 0.1 * measured(run), run


def _after_forward(rank: int, world_size: int) -> dict:
    from torch import nn
    from torch.distributed.tensor import DTensor

    from distributed_train.config import Config
    from distributed_train.engines.fsdp import device_mesh, shard

    torch.distributed.init_process_group("gloo")
    class Net(nn.Module):  # embedding-like input layer, one block (a unit), head: the root owns both ends
        def __init__(self):
            super().__init__()
            self.first, self.blocks, self.head = nn.Linear(8, 8), nn.ModuleList([nn.Linear(8, 8)]), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.blocks[0](self.first(x)))

    torch.manual_seed(0)
    model = Net()
    shard(model, list(model.blocks), device_mesh(torch.device("cpu"), 1), Config())
    model(torch.randn(4, 8)).sum()  # a forward, not yet its backward
    return {"root": [isinstance(p, DTensor) for p in [*model.first.parameters(), *model.head.parameters()]],
            "unit": [isinstance(p, DTensor) for p in model.blocks[0].parameters()]}


def test_the_root_keeps_its_gathered_parameters_for_the_backward_the_units_reshard():
    """fully_shard's default (the root does not reshard after forward: the backward needs its
    parameters first) survives fsdp.reshard_after_forward=true, which applies to the units."""
    for found in helpers.run_ranks(_after_forward, 2):
        assert found["unit"] == [True, True], found  # sharded again after the forward
        assert found["root"] == [False] * 4, found  # still gathered (plain tensors)
