"""`dtrain plan`: the interval that maximizes the model's expected goodput, the breakdown there, the
knobs, inputs measured by a run, and one-line errors for bad input."""

import json

import pytest

from distributed_train import cli
from distributed_train.cli import plan
from distributed_train.errors import UsageError
from distributed_train.training.reporting import goodput

LLAMA = ["plan", "--gpus", "16384", "--mtbf-hours", "3.09", "--state-gib", "5281", "--write-s", "300",
         "--restart-s", "600"]


def run(capsys, *argv: str) -> dict:
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_optimal_interval_beats_shorter_and_longer_ones_and_the_shares_add_up(capsys):
    result = run(capsys, *LLAMA, "--interval-minutes", "60")
    best = result["optimal"]
    assert 0.9 < best["productive"] < 0.97, best
    for other in ("interval_x0.25", "interval_x4", "given"):
        assert result[other]["productive"] < best["productive"], other
    assert sum(best[k] for k in ("productive", "checkpoint", "restart", "lost")) == pytest.approx(1.0, abs=1e-4)
    assert best["interval_s"] >= 300 - 1  # a save waits for the previous write: not sooner than it
    assert all(value >= best["productive"] - 1e-9 for value in result["knobs"].values())
    assert result["inputs"]["stall_s"] == pytest.approx(5281 / 16384 / 10)
    assert cli.main(LLAMA) == 0
    report = capsys.readouterr().out
    assert "expected goodput" in report and "MTBF doubled" in report


def test_without_a_write_time_the_interval_is_dalys_optimum():
    inputs = {"stall_s": 20.0, "write_s": 0.0, "mtbf_s": 7200.0, "restart_s": 300.0}
    assert goodput.best_interval(inputs) == pytest.approx(goodput.optimal_interval(20.0, 7200.0), rel=1e-4)


def test_failure_rates_per_gpu_and_per_node_give_the_jobs_mtbf():
    parser = plan._parser()
    per_gpu = plan._inputs(parser.parse_args(["--gpus", "64", "--failures-per-gpu-hour", "0.001", "--stall-s", "1"]))
    assert per_gpu["mtbf_s"] == pytest.approx(3600 / 0.064)
    per_node = plan._inputs(parser.parse_args(["--gpus", "64", "--node-mtbf-hours", "80", "--stall-s", "1",
                                               "--replace-s", "900", "--restart-s", "100"]))
    assert per_node["mtbf_s"] == pytest.approx(80 * 3600 / 8) and per_node["restart_s"] == 1000
    elastic = plan._inputs(parser.parse_args(["--gpus", "64", "--node-mtbf-hours", "80", "--stall-s", "1",
                                              "--replace-s", "900", "--restart-s", "100", "--elastic"]))
    assert elastic["restart_s"] == 100


def test_a_run_gives_its_measured_stall_write_and_restart(tmp_path, capsys):
    events = [{"kind": "start", "step": 0, "time": 100.0, "attempt_t0": 90.0, "startup_s": 10.0, "restore_s": 0.0},
              {"kind": "checkpoint", "step": 10, "time": 110.0, "stall_s": 0.4, "previous_write_s": 0},
              {"kind": "checkpoint", "step": 20, "time": 120.0, "stall_s": 0.6, "previous_write_s": 2.0},
              {"kind": "checkpoint", "step": 30, "time": 130.0, "stall_s": 0.5, "previous_write_s": 3.0,
               "write_cost_s": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    result = run(capsys, "plan", "--gpus", "8", "--mtbf-hours", "24", "--from-run", str(tmp_path))
    inputs = result["inputs"]
    assert (inputs["stall_s"], inputs["write_s"], inputs["restart_s"]) == (0.5, 2.5, 10.0)
    # A CPU run's background write took 0.8 s of training's cores: a cost of every save, as the stall.
    assert inputs["write_cost_s"] == 0.8
    assert goodput.goodput_at(600.0, inputs) == goodput.goodput_at(600.0, {**inputs, "stall_s": 1.3,
                                                                           "write_cost_s": 0.0})
    assert result["optimal"]["interval_s"] == pytest.approx(goodput.best_interval(inputs))
    given = run(capsys, "plan", "--gpus", "8", "--mtbf-hours", "24", "--from-run", str(tmp_path), "--stall-s", "2")
    assert given["inputs"]["write_cost_s"] == 0.0  # another job's stall: not this run's cores


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "8", "--stall-s", "1"], "needs a failure rate"),
    (["--gpus", "8", "--mtbf-hours", "5"], "needs the save stall"),
    (["--gpus", "0", "--mtbf-hours", "5", "--stall-s", "1"], "--gpus must be >= 1"),
    (["--gpus", "8", "--mtbf-hours", "-5", "--stall-s", "1"], "--mtbf-hours must be a positive number"),
    (["--gpus", "8", "--mtbf-hours", "nan", "--stall-s", "1"], "--mtbf-hours must be a positive number"),
    (["--gpus", "8", "--mtbf-hours", "5", "--from-run", "/nonexistent"], "no metrics.jsonl"),
    (["--gpus", "8", "--mtbf-hours", "5", "--node-mtbf-hours", "5", "--stall-s", "1"], "not allowed with"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(UsageError, match=message):
        cli.main(["plan", *argv, "--debug"])
