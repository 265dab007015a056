"""Options that only show in a real run, on 2 gloo ranks, all in one spawn (spawning is the slow
part): train.compile, the ddp.* options and which gradient path ran, train.flush_denormal, the
data position after a resume with another batch size, and the SIGTERM save that refuses a
NaN state."""

from __future__ import annotations

import functools
import io
import sys
from pathlib import Path

import pytest
import torch

from distributed_train.training.checkpoints.commit import (
    checkpoint_name,
    committed_checkpoints,
)
from distributed_train.training.data import epoch_permutation
from distributed_train.training.reporting.metrics import read_events
from tests.helpers import EXACT, FP64, REPO, fresh_port, run_ranks

pytestmark = pytest.mark.distributed

TASKS = REPO / "tests" / "tasks"
TOY = f"--task={TASKS / 'toy.py'}:Regression"
SEEN = f"{TASKS / 'options_probe.py'}:SeenSamples"
SEED = 3
COMMON = ["--train.batch_size=24", "--train.max_steps=4", "--train.optimizer=sgd", "--train.lr=0.05",
          f"--seed={SEED}", "--log.every_steps=2", "--eval.batch_size=25", "--log.wandb=disabled",
          "--dist.timeout_s=60"]


def _train(run_dir: Path, overrides: list[str], job: str = ""):
    """One job as this rank on a fresh port: (summary or the Preempted it raised, the engine it
    trained, this rank's log lines)."""
    import os

    from distributed_train import distributed
    from distributed_train.cli.train import resolve_config
    from distributed_train.distributed.preemption import Preempted
    from distributed_train.training import trainer
    from distributed_train.training.run import run_training

    os.environ["MASTER_PORT"] = str(fresh_port(int(os.environ["RANK"]), run_dir.parent, job or run_dir.name))
    engines = []
    build_engine = trainer.build_engine

    def build_and_keep(*args, **kwargs):
        engines.append(build_engine(*args, **kwargs))
        return engines[-1]

    trainer.build_engine, stderr, sys.stderr = build_and_keep, sys.stderr, io.StringIO()
    try:  # the log handler is made at the start of the job, on the stderr of that moment
        outcome = run_training(resolve_config(None, [*COMMON, *overrides, f"--run_dir={run_dir}"]),
                               distributed.read_env())
    except Preempted as exc:
        outcome = exc
    finally:
        trainer.build_engine, log_text, sys.stderr = build_engine, sys.stderr.getvalue(), stderr
    return outcome, engines[0], log_text


def _ddp_settings(engine) -> dict:
    """What DDP's C++ reducer was given and did (its own logging record), and the gradient path."""
    from torch._dynamo.eval_frame import OptimizedModule

    data = engine.model._get_ddp_logging_data()
    buckets = data.get("rebuilt_bucket_sizes", data["bucket_sizes"])  # DDP rebuilds them after step 1
    return {"bucket_cap_bytes": data["bucket_cap_bytes"], "buckets": len(str(buckets).split(",")),
            "gradient_as_bucket_view": data["gradient_as_bucket_view"],
            "static_graph": int(engine.model.static_graph),
            "find_unused_parameters": data["find_unused_parameters"], "comm_hook": data.get("comm_hook"),
            "shm_allreduce": engine.shm_allreduce is not None,
            "compiled": isinstance(engine.model.module, OptimizedModule)}


def _engine_jobs(tmp: Path, out: dict) -> None:
    """train.compile, the ddp.* options and train.flush_denormal, each in a job of the toy task."""
    from torch._dynamo.utils import counters

    from tests.tasks.options_probe import denormals_flushed

    out["flushed_at_start"] = denormals_flushed()
    # The reference, through the shared-memory all-reduce; flush_denormal off; float64, as the
    # compiled job it is compared with (helpers.EXACT).
    _, engine, _ = _train(tmp / "reference", [TOY, FP64, "--ddp.shm_allreduce=require",
                                              "--train.flush_denormal=false"])
    out["reference"] = _ddp_settings(engine)
    out["flushed_after_false"] = denormals_flushed()

    # train.compile=true: the same job with DDP(torch.compile(model)). A cold compile with inductor
    # takes ~40 s on 2 cores (PITFALLS.md); aot_eager runs the same Dynamo capture and AOT autograd
    # graphs without generating C++, and the run's part (compile before DDP, the state dict, the
    # math) is the same for every backend.
    compile_ = torch.compile
    torch.compile = functools.partial(compile_, backend="aot_eager")
    counters.clear()
    try:
        _, engine, _ = _train(tmp / "compiled", [TOY, FP64, "--ddp.shm_allreduce=require", "--train.compile=true",
                                                 "--train.flush_denormal=false"])
    finally:
        torch.compile = compile_
    out["compiled"] = _ddp_settings(engine)
    out["graphs_compiled"] = counters["stats"]["unique_graphs"]

    # fp16 compression: shm_allreduce=auto must step aside. A 10-byte bucket cap splits the 4
    # parameters into several buckets; static_graph keeps the first step's single bucket, so it
    # has a job of its own.
    _, engine, log_text = _train(tmp / "options", [
        TOY, "--ddp.comm_hook=fp16", "--ddp.bucket_cap_mb=0.00001", "--ddp.gradient_as_bucket_view=false"])
    out["options"], out["options_log"] = _ddp_settings(engine), log_text
    out["flushed_after_default"] = denormals_flushed()
    summary, engine, _ = _train(tmp / "static", [TOY, "--ddp.static_graph=true"])
    out["static"] = {**_ddp_settings(engine), "global_step": summary["global_step"]}
    # find_unused_parameters lets a model with an unused layer train (the default refuses it).
    summary, engine, _ = _train(tmp / "unused", [f"--task={TASKS / 'broken_tasks.py'}:UnusedParameter",
                                                 "--ddp.find_unused_parameters=true"])
    out["unused"] = {**_ddp_settings(engine), "global_step": summary["global_step"]}


def _position_jobs(tmp: Path, out: dict) -> None:
    """3 steps of 24 (72 samples of epoch 0), then resumed with batch 12 (72 is a whole number of
    its steps) and, from the same checkpoint, with batch 16 (it is not); the samples of each step."""
    from distributed_train.task import resolve_attr

    seen = resolve_attr(SEEN).seen
    position = ["--task=" + SEEN, "--train.optimizer=sgd", "--train.lr=0.01", "--checkpoint.every_steps=3"]
    for name, extra in [("first", ["--train.max_steps=3"]),
                        ("batch12", ["--train.max_steps=6", "--train.batch_size=12"]),
                        ("batch16", ["--train.max_steps=5", "--train.batch_size=16"])]:
        seen.clear()
        resume = ["--checkpoint.allow_changes=true", "--checkpoint.every_steps=0"] if name != "first" else []
        summary, _, _ = _train(tmp / "position", [*position, *extra, *resume], job=f"position-{name}")
        out[f"seen_{name}"] = [list(ids) for ids in seen]
        out[f"resumed_{name}"] = summary["resumed_from"]


def option_jobs(rank: int, world_size: int, tmp: str) -> dict:
    """Every job of this file, in one process per rank; returns what each one showed."""
    tmp, out = Path(tmp), {}
    _engine_jobs(tmp, out)
    _position_jobs(tmp, out)
    # SIGTERM on rank 0 right after its loss became NaN: the stop must not commit that state.
    outcome, _, log_text = _train(tmp / "nan-sigterm", [
        f"--task={TASKS / 'options_probe.py'}:NaNAndSigterm", "--task_args.step=2", "--task_args.rank=0",
        "--train.max_steps=2000", "--log.every_steps=5000", "--eval.every_steps=0"])
    out["nan_sigterm"] = {"stopped": type(outcome).__name__, "step": getattr(outcome, "step", None),
                          "log": log_text}
    return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """rank -> what each job showed, and the jobs' parent directory."""
    tmp = tmp_path_factory.mktemp("options")
    return run_ranks(option_jobs, 2, str(tmp), timeout=240), tmp


def test_compile_trains_through_ddp_of_the_compiled_model_to_the_same_parameters(jobs):
    results, tmp = jobs
    for result in results:
        assert result["compiled"]["compiled"] and not result["reference"]["compiled"]
        assert result["graphs_compiled"] >= 1, "Dynamo captured no graph: nothing was compiled"
        assert result["compiled"]["shm_allreduce"]
    reference = torch.load(tmp / "reference" / "final_model.pt", weights_only=True)
    compiled = torch.load(tmp / "compiled" / "final_model.pt", weights_only=True)
    assert compiled.keys() == reference.keys()  # no `_orig_mod.` / `module.` prefixes
    for name in reference:
        torch.testing.assert_close(compiled[name], reference[name], rtol=0, atol=EXACT)
    assert [e["step"] for e in read_events(tmp / "compiled") if e["kind"] == "train"] == [2, 4]


def test_ddp_options_reach_the_reducer_and_fp16_turns_the_shared_memory_path_off(jobs):
    results, tmp = jobs
    for result in results:
        reference, options = result["reference"], result["options"]
        assert reference["bucket_cap_bytes"] == 25 * 2**20 and reference["buckets"] == 1
        assert (reference["gradient_as_bucket_view"], reference["static_graph"]) == (1, 0)
        assert reference["shm_allreduce"] and reference["comm_hook"] != "fp16_compress_hook"

        assert options["bucket_cap_bytes"] == int(0.00001 * 2**20)
        assert options["buckets"] > 1, "a 10-byte bucket cap still gave one bucket"
        assert options["gradient_as_bucket_view"] == 0 and options["comm_hook"] == "fp16_compress_hook"
        assert not options["shm_allreduce"], "ddp.comm_hook=fp16 must leave the all-reduce to the backend"
        assert result["unused"]["find_unused_parameters"] == 1 and result["unused"]["global_step"] == 4
        assert reference["find_unused_parameters"] == 0
        assert result["static"]["static_graph"] == 1 and result["static"]["global_step"] == 4
    assert "gradients averaged through shared memory" not in results[0]["options_log"]
    # fp16 compression changes the math slightly, not the result.
    reference = torch.load(tmp / "reference" / "final_model.pt", weights_only=True)
    compressed = torch.load(tmp / "options" / "final_model.pt", weights_only=True)
    worst = max((compressed[k] - reference[k]).abs().max().item() for k in reference)
    assert 0 < worst < 1e-3, worst


def test_flush_denormal_is_applied_in_the_worker_and_off_when_false(jobs):
    results, _ = jobs
    for result in results:
        assert not result["flushed_at_start"] and not result["flushed_after_false"]
        assert result["flushed_after_default"]


def _step_samples(results: list[dict], name: str) -> list[set[int]]:
    """The samples of each optimizer step of job `name`, both ranks together."""
    per_rank = [result[f"seen_{name}"] for result in results]
    assert len({len(steps) for steps in per_rank}) == 1, per_rank
    return [set(a) | set(b) for a, b in zip(*per_rank)]


def test_resume_with_another_batch_size_continues_at_the_next_sample(jobs):
    results, tmp = jobs
    epoch0, epoch1 = epoch_permutation(96, SEED, 0), epoch_permutation(96, SEED, 1)
    first = _step_samples(results, "first")
    assert first == [set(epoch0[s:s + 24]) for s in (0, 24, 48)]
    # batch 12: 72 samples are 6 of its steps: the next step starts at sample 72 exactly.
    checkpoint = str(tmp / "position" / "checkpoints" / checkpoint_name(3))
    assert results[0]["resumed_batch12"].endswith(checkpoint_name(3)), results[0]["resumed_batch12"]
    assert _step_samples(results, "batch12") == [set(epoch0[72:84]), set(epoch0[84:96]), set(epoch1[:12])]
    # batch 16: 72 is not a whole number of its steps; the documented rule (TrainStream) rounds
    # up to the next step, 80: samples 72-79 are skipped this epoch, none is trained twice.
    assert results[0]["resumed_batch16"] == results[0]["resumed_batch12"] == checkpoint
    assert _step_samples(results, "batch16") == [set(epoch0[80:96]), set(epoch1[:16])]


def test_sigterm_after_a_nan_step_commits_no_checkpoint(jobs):
    results, tmp = jobs
    for result in results:
        stop = result["nan_sigterm"]
        assert stop["stopped"] == "Preempted" and 2 <= stop["step"] < 2000, stop
    assert committed_checkpoints(tmp / "nan-sigterm" / "checkpoints") == []
    assert "SIGTERM: the loss or the parameters are NaN/inf: no checkpoint committed" in \
        results[0]["nan_sigterm"]["log"], results[0]["nan_sigterm"]["log"]


def test_cpu_events_leave_out_what_they_cannot_know(jobs):
    _, tmp = jobs
    train = [e for e in read_events(tmp / "reference") if e["kind"] == "train"]
    assert [e["step"] for e in train] == [2, 4]
    # docs/logging.md: no mfu on a CPU without log.peak_tflops, no tokens_per_s without tokens
    assert all("mfu" not in e and "tokens_per_s" not in e and e["samples_per_s"] > 0 for e in train), train


def _one_rank_wrapped(rank: int, world_size: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from distributed_train.batches import BatchPlan
    from distributed_train.config import load_config
    from distributed_train.distributed import DistEnv
    from distributed_train.engines.ddp import DDPEngine
    from distributed_train.task import load_task

    torch.distributed.init_process_group("gloo")
    env = DistEnv(rank=0, world_size=1, master_addr="127.0.0.1", master_port=1)
    out = {}
    for wrap in (False, True):
        config = load_config(None, [f"--task={REPO / 'tests' / 'tasks' / 'toy.py'}:Regression", FP64,
                                    "--train.batch_size=12", f"--ddp.wrap_one_rank={str(wrap).lower()}"])
        task = load_task(config.task, config)
        torch.manual_seed(0)
        engine = DDPEngine(task, config, env, torch.device("cpu"), BatchPlan.make(12, 1, 4), total_steps=3)
        x, y = task.train_dataset()[:12]
        for _ in range(3):  # three micro-batches a step: no_sync on the first two when wrapped
            engine.train_step([(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)])
        out[wrap] = {"ddp": isinstance(engine.model, DDP),
                     "params": [p.detach().clone() for p in engine.raw_model.parameters()]}
    return out


def test_one_rank_can_be_wrapped_in_ddp_for_checks_and_trains_the_same():
    (found,) = run_ranks(_one_rank_wrapped, 1)
    assert (found[False]["ddp"], found[True]["ddp"]) == (False, True)
    assert all(torch.equal(a, b) for a, b in zip(found[False]["params"], found[True]["params"]))
