"""Profile mode: `train.profile_steps` writes a trace and an operator table per rank."""

import json
import warnings

import torch

from distributed_train import distributed
from distributed_train.cli.train import resolve_config
from distributed_train.training.reporting.profiling import StepProfiler
from distributed_train.training.run import run_training


def test_profile_steps_writes_a_trace_of_the_requested_steps(tmp_path):
    config = resolve_config(None, ["--task=digits", "--train.max_steps=5", "--train.profile_steps=2",
                                   "--log.wandb=disabled", f"--run_dir={tmp_path}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(config, distributed.DistEnv())
    assert not [w for w in caught if "torch/profiler" in w.filename.replace("\\", "/")], \
        [str(w.message) for w in caught]  # nothing for the user to wonder about (torch 2.11 warned)
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2  # steps 2 and 3: the first step (warm-up) is left out
    table = (tmp_path / "profile" / "top_ops_rank0.txt").read_text()
    assert table.startswith("2 training steps on rank 0") and "aten::addmm" in table


def test_a_run_shorter_than_the_profile_writes_what_it_recorded(tmp_path):
    profiler = StepProfiler(10, tmp_path, rank=3, device=torch.device("cpu"))
    for step in (1, 2, 3):
        torch.ones(4).sum()
        profiler.step(step, total_steps=3)
    assert profiler.done and profiler.recorded == 2
    assert (tmp_path / "profile" / "trace_rank3.json").is_file()


def test_profiling_off_or_a_single_step_records_nothing(tmp_path):
    off = StepProfiler(0, tmp_path, 0, torch.device("cpu"))
    off.step(1, 5)
    single = StepProfiler(3, tmp_path, 0, torch.device("cpu"))
    single.step(1, 1)
    assert off.profile is None and single.done and not (tmp_path / "profile").exists()
