"""engine=accelerate: the same math as engine=ddp on 2 gloo ranks (with accumulation too), exact
resume (also by the ddp engine), our process group reused, and the silent unsynced-CPU case caught.

All 2-rank jobs run in one spawn (spawning is the slow part); the tests below read its results.
"""

import os

import pytest
import torch

from distributed_train.config import load_config
from distributed_train.distributed import DistEnv
from distributed_train.errors import UsageError
from tests.helpers import EXACT, FP64, max_diff, run_ranks

# Digits with a small MLP: 1,500 training images, global batch 32 (16 per rank), 6 steps; float64,
# since the engines' results are compared with each other (helpers.EXACT).
BASE = [FP64, "--task=digits", "--task_args.hidden=32", "--train.batch_size=32", "--train.max_steps=6",
        "--seed=5", "--train.lr=0.01", "--log.every_steps=2", "--log.wandb=disabled"]
# Warmup + cosine catches a scheduler stepped per process; clipping runs Accelerate's clip path.
SCHEDULED = ["--train.schedule=cosine", "--train.warmup_steps=2", "--train.grad_clip=0.5"]
ACCUMULATED = ["--train.micro_batch_size=4"]  # 4 micro-steps of 4 per rank
JOBS = {
    "ddp": SCHEDULED,
    "accelerate": [*SCHEDULED, "--engine=accelerate"],
    "ddp_accum": ACCUMULATED,
    # Also the uninterrupted reference of the resume below (checkpoints do not change the math).
    "accelerate_accum": [*ACCUMULATED, "--engine=accelerate", "--checkpoint.every_steps=3"],
    "stopped": [*ACCUMULATED, "--engine=accelerate", "--checkpoint.every_steps=3", "--train.max_steps=3"],
    # The same checkpoint format: the ddp engine continues the accelerate engine's checkpoint.
    "ddp_from_accelerate": [*ACCUMULATED, "--checkpoint.resume={tmp}/stopped/checkpoints/step-00000003"],
    "resumed": [*ACCUMULATED, "--engine=accelerate", "--checkpoint.every_steps=3"],
}


def _config(run_dir, extra):
    from distributed_train.cli.train import resolve_config

    return resolve_config(None, [*BASE, *extra, f"--run_dir={run_dir}"])


def _silent_case(env: DistEnv, device: torch.device, tmp: str) -> dict:
    """What Accelerate does on CPU without cpu=True, and what our checks make of it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from distributed_train.engines import accelerate as engine_accelerate
    from distributed_train.training.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator()  # what `accelerate launch --multi_gpu` gives a CPU script
    model = accelerator.prepare(torch.nn.Linear(4, 1))
    # Each rank steps on its own data: without a real DDP wrapper nothing averages the gradients.
    torch.manual_seed(env.rank)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    out = {"type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
           "grad": model.weight.grad.clone()}
    try:
        engine_accelerate.check_world(env, accelerator.num_processes, accelerator.process_index,
                                      accelerator.distributed_type)
    except UsageError as exc:
        out["check_error"] = str(exc)
    original = engine_accelerate.use_cpu
    engine_accelerate.use_cpu = lambda device: False  # the engine as if it forgot cpu=True
    try:
        Trainer(_config(f"{tmp}/silent", ["--engine=accelerate"]), env, device)
    except UsageError as exc:
        out["engine_error"] = str(exc)
    finally:
        engine_accelerate.use_cpu = original
    return out


def accelerate_jobs(rank: int, world_size: int, tmp: str) -> dict:
    """Every job of JOBS in turn on one process group; final parameters and summaries per job."""
    import torch.distributed as torch_dist

    from distributed_train import distributed
    from distributed_train.training.trainer import Trainer

    os.environ.pop("ACCELERATE_USE_CPU", None)
    env, device = distributed.read_env(), torch.device("cpu")
    distributed.init(env, "gloo", device, timeout_s=60)
    group = torch_dist.distributed_c10d._get_default_group()
    results: dict = {}
    try:
        for name, extra in JOBS.items():
            run_dir = f"{tmp}/{'stopped' if name in ('stopped', 'resumed') else name}"
            trainer = Trainer(_config(run_dir, [e.format(tmp=tmp) for e in extra]), env, device)
            summary = trainer.fit()
            state = {k: v.clone() for k, v in trainer.engine.raw_model.state_dict().items()}
            results[name] = {"summary": summary, "engine": type(trainer.engine).__name__, "state": state}
            if name == "accelerate":
                accelerator = trainer.engine.accelerator
                results["accelerator"] = {
                    "type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
                    "same_group": torch_dist.distributed_c10d._get_default_group() is group,
                    "wrapped": type(trainer.engine.model).__name__}
        results["silent"] = _silent_case(env, device, tmp)
    finally:
        distributed.teardown()
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(accelerate_jobs, 2, str(tmp_path_factory.mktemp("accelerate")))


@pytest.mark.distributed
@pytest.mark.parametrize("reference, candidate", [("ddp", "accelerate"), ("ddp_accum", "accelerate_accum")])
def test_accelerate_matches_ddp(ranks, reference, candidate):
    ref, run = ranks[0][reference], ranks[0][candidate]
    assert (ref["engine"], run["engine"]) == ("DDPEngine", "AccelerateEngine")
    assert run["summary"]["world_size"] == 2 and run["summary"]["global_step"] == 6
    assert max_diff(run["state"], ref["state"]) <= EXACT
    assert run["summary"]["train_loss"] == pytest.approx(ref["summary"]["train_loss"], rel=EXACT)
    for name, value in ref["summary"]["eval"].items():
        assert run["summary"]["eval"][name] == pytest.approx(value, rel=EXACT), name


@pytest.mark.distributed
def test_accelerate_is_real_ddp_on_our_process_group(ranks):
    info = ranks[0]["accelerator"]
    assert info == {"type": "DistributedType.MULTI_CPU", "num_processes": 2, "same_group": True,
                    "wrapped": "DistributedDataParallel"}
    for name in ("accelerate", "accelerate_accum"):
        assert max_diff(ranks[0][name]["state"], ranks[1][name]["state"]) == 0.0, name


@pytest.mark.distributed
def test_accelerate_resume_is_bit_identical(ranks):
    stopped, resumed, whole = (ranks[0][n] for n in ("stopped", "resumed", "accelerate_accum"))
    assert stopped["summary"]["global_step"] == 3 and stopped["summary"]["resumed_from"] is None
    assert resumed["summary"]["resumed_from"].endswith("step-00000003")
    assert all(torch.equal(resumed["state"][k], whole["state"][k]) for k in whole["state"])
    assert resumed["summary"]["train_loss"] == whole["summary"]["train_loss"]
    crossed = ranks[0]["ddp_from_accelerate"]
    assert crossed["engine"] == "DDPEngine" and crossed["summary"]["resumed_from"].endswith("step-00000003")
    assert max_diff(crossed["state"], whole["state"]) <= EXACT


@pytest.mark.distributed
def test_unsynced_cpu_accelerator_is_caught(ranks):
    rank0, rank1 = ranks[0]["silent"], ranks[1]["silent"]
    # The trap is real: a plain Accelerator() on 2 CPU ranks is one process each, gradients differ.
    assert (rank0["type"], rank0["num_processes"]) == ("DistributedType.NO", 1)
    assert not torch.equal(rank0["grad"], rank1["grad"])
    for silent in (rank0, rank1):
        assert "2 ranks" in silent["check_error"] and "ACCELERATE_USE_CPU=1" in silent["check_error"]
        assert "would not be synchronised" in silent["engine_error"]


# ---- no process group -------------------------------------------------------------------------

def test_check_world_accepts_a_matching_job_and_names_the_fix_otherwise():
    from distributed_train.engines.accelerate import check_world

    two = DistEnv(rank=1, world_size=2, master_addr="127.0.0.1", master_port=1)
    check_world(two, 2, 1, "MULTI_CPU")
    check_world(DistEnv(), 1, 0, "NO")
    for args in [(1, 0, "NO"), (2, 1, "NO"), (2, 0, "MULTI_CPU")]:
        with pytest.raises(UsageError, match="ACCELERATE_USE_CPU=1"):
            check_world(two, *args)


def test_precision_and_plugin_settings_fail_early_on_cpu():
    from distributed_train.batches import BatchPlan
    from distributed_train.engines.accelerate import mixed_precision, plugin_kwargs

    cpu = torch.device("cpu")
    assert [mixed_precision(p, cpu) for p in ("fp32", "bf16")] == ["no", "bf16"]
    with pytest.raises(UsageError, match="train.precision=fp16 needs a CUDA device"):
        mixed_precision("fp16", cpu)
    config = load_config(None, ["--engine=accelerate", "--accelerate.fsdp.fsdp_version=2"])
    assert config.accelerate.fsdp == {"fsdp_version": 2}  # read as YAML: an int, not "2"
    with pytest.raises(UsageError, match="accelerate.fsdp needs CUDA GPUs"):
        plugin_kwargs(config, BatchPlan.make(64, 1, None), cpu)
    with pytest.raises(UsageError, match="need engine=accelerate"):
        load_config(None, ["--accelerate.deepspeed.zero_stage=2"])
    with pytest.raises(UsageError, match="exclude each other"):
        load_config(None, ["--engine=accelerate", "--accelerate.fsdp.fsdp_version=2",
                           "--accelerate.deepspeed.zero_stage=2"])


def test_one_process_runs_fp32_then_bf16_in_the_same_interpreter(tmp_path):
    """Accelerate's per-process state is reset per run: a second run with other precision works."""
    from distributed_train.cli.train import resolve_config
    from distributed_train.tasks.digits import DigitsTask
    from distributed_train.training.run import run_training

    evals = {}
    for precision in ("fp32", "bf16"):
        config = resolve_config(None, [*BASE, "--train.max_steps=2", "--engine=accelerate",
                                       f"--train.precision={precision}", f"--run_dir={tmp_path / precision}"])
        summary = run_training(config, DistEnv())
        assert summary["world_size"] == 1 and summary["global_step"] == 2
        evals[precision] = summary["eval"]
    # The reference: the untrained model the same seed builds (eval loss 2.31, accuracy 0.07); two
    # steps reach 2.275 and 0.18 in either precision. A run that did not train stays at the reference.
    with torch.random.fork_rng():
        torch.manual_seed(5)
        task = DigitsTask(config)
        images, labels = task.eval_dataset().tensors
        with torch.no_grad():
            logits = task.model()(images)
    untrained_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    untrained_accuracy = (logits.argmax(-1) == labels).float().mean().item()
    for precision, metrics in evals.items():
        assert metrics["loss"] < untrained_loss - 0.02, (precision, metrics, untrained_loss)
        assert metrics["accuracy"] > untrained_accuracy + 0.05, (precision, metrics, untrained_accuracy)
    # The second run really ran in bf16 (not a leftover fp32 state): close to fp32, not equal to it.
    assert evals["bf16"]["loss"] != evals["fp32"]["loss"], evals
    assert evals["bf16"]["loss"] == pytest.approx(evals["fp32"]["loss"], abs=0.01), evals
