"""The benchmark scripts run: one pair of runs agrees on the final loss; the goodput validation
kills a worker and accounts for it; the checkpoint-stall benchmark times both savers on both
engines; the GPU acceptance script parses and covers every check."""

import re
import sys

import pytest

from tests.helpers import REPO, clean_env, run_cmd

pytestmark = pytest.mark.slow


def test_one_pair_of_runs_agrees_on_the_final_loss():
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "run.py"), "--workloads", "digits",
                    "--pairs", "1", "--scale", "0.04", "--startup-pairs", "1", "--check-steps", "20"],
                   timeout=180)
    assert "Same math: with the same kernels both sides logged the same loss" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| digits"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    plain_rate, ours_rate = (float(c.replace(",", "")) for c in cells[3:5])
    assert plain_rate > 0 and ours_rate > 0
    plain_loss, ours_loss = (float(x) for x in re.findall(r"[\d.]+", cells[-1]))
    assert ours_loss == pytest.approx(plain_loss, rel=1e-3)
    assert "DIFFER" not in row and "torch " in proc.stdout  # the machine/torch/date line
    assert re.search(r"plain torchrun [\d.]+ s, `dtrain launch` [\d.]+ s", proc.stdout), proc.stdout
    assert re.search(r"digits pair 1/1: first step after plain [\d.]+ s, ours [\d.]+ s", proc.stderr), proc.stderr


def test_the_goodput_validation_kills_a_worker_and_accounts_for_it(tmp_path):
    """The fault-injection benchmark's short form: one SIGKILL of a worker, torchrun restarts, the
    job finishes; its measured costs and both goodput figures are reported (the 5-point goal is the
    full benchmark's, on a quiet machine: not asserted here)."""
    out = tmp_path / "goodput.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "goodput_validation.py"), "--short", "--out", str(out)],
                   timeout=240, check=False, env=clean_env(TMPDIR=str(tmp_path)))  # its runs: kept when a goal fails
    assert proc.returncode in (0, 1) and "| every 1.2 s, one kill |" in proc.stdout, proc.stdout + proc.stderr
    (row,) = __import__("json").loads(out.read_text())["rows"]
    assert row["kills"] == 1 and row["restart_s"] > 0 and row["stall_s"] > 0, row
    assert 0 < row["measured"] < 1 and 0 < row["predicted"] < 1, row


def test_the_checkpoint_stall_benchmark_times_both_savers_on_both_engines():
    """Small (2M parameters, one timed save each): the table and the goal lines are printed; the
    goals are the full benchmark's (not asserted here)."""
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "checkpoint_stall.py"), "--params", "2e6",
                    "--repeats", "1"], timeout=180, check=False)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| ddp", "| fsdp"))]
    assert [row.split("|")[3].strip() for row in rows] == ["dtrain", "plain", "dtrain", "plain"], proc.stdout
    assert all(float(cell.split()[0]) > 0 for row in rows for cell in row.strip("|").split("|")[3:]), rows
    assert len(re.findall(r"^(met|NOT MET): +(ddp|fsdp): (stall|total) ", proc.stdout, re.M)) == 4, proc.stdout


@pytest.mark.timeout(900)  # ~2.7 minutes alone, ~4.5 with the suite's other worker beside it (2 cores)
def test_the_gpu_acceptance_scripts_dry_run_passes_every_row(tmp_path):
    """GPU_CHECK_DRY=1: every row of benchmarks/gpu_check.sh, small, on CPU (gloo), into a folder
    given as its argument. Only CPU offload is skipped (it needs CUDA); on the GPU every row runs."""
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    proc = run_cmd(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)], timeout=840, check=False,
                   env=clean_env(GPU_CHECK_DRY="1", TMPDIR=str(scratch), PYTHON=sys.executable))
    table = (out / "gpu_check.md").read_text()
    rows = {cells[0]: cells[1] for cells in (line.strip("|").split(" | ") for line in table.splitlines()
                                             if line.startswith("| ") and not line.startswith("| check"))}
    rows = {name.strip(): result.strip() for name, result in rows.items() if result.strip() != "---"}
    expected = ["doctor", "collectives", "fp32", "bf16", "bf16 vs fp32", "engines agree", "resume", "fsdp resume",
                "cpu offload", "cpu load", "exact eval", "gpt2 ddp compile=false", "gpt2 fsdp compile=false",
                "fabric gpt2"]
    assert list(rows) == expected, table
    assert rows.pop("cpu offload") == "SKIP" and set(rows.values()) == {"PASS"}, table + proc.stderr[-3000:]
    assert proc.returncode == 0 and "DRY RUN on CPU" in table, proc.stdout[-3000:]
    assert (out / "logs" / "equal.log").is_file() and (out / "logs" / "gpt-fsdp-false.log").is_file()
    # Every row passed: the runs' folders are removed (the benchmark's token file and torch's compile
    # cache are caches, kept on purpose).
    assert sorted(p.name for p in scratch.iterdir() if p.name not in ("dtrain-bench-lm", "torchinductor_root")) == []


@pytest.mark.parametrize("dry, findings, passes", [
    ("1", "rank 1 matmul 0.0119 TFLOP/s is under 0.5x the median 0.0307", True),
    ("1", "all-reduce of 4096 bytes gave a wrong sum; rank 1 matmul 0.0119 TFLOP/s is under 0.5x the median 0.0307",
     False),
    ("0", "rank 1 matmul 0.0119 TFLOP/s is under 0.5x the median 0.0307", False),
])
def test_the_acceptance_scripts_doctor_row_excuses_only_a_shared_cpus_matmul_speed_and_only_dry(
        tmp_path, dry, findings, passes):
    # The row's own function, run against a stand-in doctor whose verdict is UNHEALTHY (exit 1).
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    function = script[script.index("doctor_check() {"):]
    function = function[:function.index("\n}\n") + 3]
    doctor = tmp_path / "doctor"
    doctor.write_text(f"#!/bin/sh\necho 'verdict: UNHEALTHY (peak busbw 0.9 GB/s, matmul 0.01-0.05 TFLOP/s): "
                      f"{findings}'\nexit 1\n")
    doctor.chmod(0o755)
    proc = run_cmd(["bash", "-c", f"{function}\nDTRAIN=({doctor}); LOGS={tmp_path}; DRY={dry}; doctor_check"],
                   check=False)
    assert (proc.returncode == 0) == passes, proc.stdout + proc.stderr
    assert ("is this shared CPU's (dry run)" in proc.stdout) == passes, proc.stdout


def _gpu_check_with_no_time(tmp_path, **env):
    """The acceptance script, dry, with a budget of 0 s: no row runs. Its exit code, the rows of its
    table (name, result), the table and stderr."""
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    proc = run_cmd(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)], timeout=120, check=False,
                   env=clean_env(GPU_CHECK_DRY="1", GPU_CHECK_BUDGET_S="0", TMPDIR=str(scratch),
                                 PYTHON=sys.executable, **env))
    # No run folder left behind (none was made); the benchmark's token file is a cache.
    assert [p.name for p in scratch.iterdir() if p.name != "dtrain-bench-lm"] == []
    table = (out / "gpu_check.md").read_text() if proc.returncode != 2 else ""
    rows = [tuple(cell.strip() for cell in line.strip("|").split("|")[:2]) for line in table.splitlines()
            if line.startswith("| ") and not line.startswith(("| check", "| ---"))]
    return proc.returncode, rows, table, proc.stderr


def test_the_acceptance_scripts_budget_spent_leaves_every_row_in_the_table_as_not_run(tmp_path):
    """GPU_CHECK_BUDGET_S=0: no row starts, yet the table names every row (NOT RUN) and exit is 1;
    GPU_CHECK_ROWS names rows from the same list (an unknown one: exit 2, the list)."""
    code, rows, table, _ = _gpu_check_with_no_time(tmp_path)
    assert code == 1 and len(rows) == 14 and {result for _, result in rows} == {"NOT RUN"}, table
    assert "14 rows NOT RUN: GPU_CHECK_BUDGET_S=0 was spent before them" in table, table
    code, _, _, stderr = _gpu_check_with_no_time(tmp_path, GPU_CHECK_ROWS="resume,bogus")
    assert code == 2 and "GPU_CHECK_ROWS: no row 'bogus'; the rows: " in stderr, stderr
    assert stderr.strip().split("the rows: ")[1].split(",") == [name for name, _ in rows]


def test_the_acceptance_scripts_named_rows_run_with_the_rows_whose_runs_they_read(tmp_path):
    code, rows, table, _ = _gpu_check_with_no_time(tmp_path, GPU_CHECK_ROWS="fabric gpt2,exact eval")
    assert [name for name, _ in rows] == ["resume", "exact eval", "gpt2 ddp compile=false", "fabric gpt2"], table
    assert "Only GPU_CHECK_ROWS=fabric gpt2,exact eval and the rows whose runs they read" in table


def test_the_acceptance_scripts_budget_cuts_a_rows_time_limit_and_skips_the_rest(tmp_path):
    # The script's own row machinery (row() .. check()), run on a row that would take a minute.
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    helpers = script[script.index("row() {"):]
    helpers = helpers[:helpers.index("\n}\n", helpers.index("check() {")) + 3]
    results = tmp_path / "table.md"
    proc = run_cmd(["bash", "-c", f"{helpers}\nslow() {{ sleep 40; }}\nRESULTS={results}; LOGS={tmp_path}; "
                    "FAILED=0; NOT_RUN=0; BUDGET=25\ncheck long 300 long.log slow; check later 300 later.log slow\n"
                    "echo FAILED=$FAILED NOT_RUN=$NOT_RUN"], timeout=120, check=False)
    first, second = results.read_text().splitlines()
    # 25 s in all, 10 of them kept for the KILL after a TERM: this row got at most 15 s, not 300.
    limit = re.fullmatch(r"\| long \| \*\*FAIL\*\* \| timed out after (\d+)s \(the end of GPU_CHECK_BUDGET_S=25\) "
                         r"\(log: logs/long.log\) \|", first)
    assert limit and 10 <= int(limit[1]) <= 15, first
    assert re.fullmatch(r"\| later \| NOT RUN \| GPU_CHECK_BUDGET_S=25: \d+ s left \|", second), second
    assert proc.stdout.strip().endswith("FAILED=1 NOT_RUN=1"), proc.stdout + proc.stderr
