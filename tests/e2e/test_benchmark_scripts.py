"""The benchmark scripts run: one pair of runs agrees on the final loss; the GPU acceptance script
parses and covers every check (both start subprocesses)."""

import re
import sys

import pytest

from tests.helpers import REPO, run_cmd

pytestmark = pytest.mark.slow


def test_one_pair_of_runs_agrees_on_the_final_loss():
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "run.py"), "--workloads", "digits",
                    "--pairs", "1", "--scale", "0.04", "--startup-pairs", "0", "--check-steps", "20"],
                   timeout=180)
    assert "Same math: with the same kernels both sides logged the same loss" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| digits"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    plain_rate, ours_rate = (float(c.replace(",", "")) for c in cells[3:5])
    assert plain_rate > 0 and ours_rate > 0
    plain_loss, ours_loss = (float(x) for x in re.findall(r"[\d.]+", cells[-1]))
    assert ours_loss == pytest.approx(plain_loss, rel=1e-3)
    assert "DIFFER" not in row and "torch " in proc.stdout  # the machine/torch/date line



def test_the_gpu_acceptance_script_parses_and_covers_every_check():
    import subprocess

    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for check in ("doctor", "collectives", '"$precision"', "resume", '"cpu load"', '"exact eval"',
                  '"gpt2 $engine compile=$compile"', "fsdp-false", "exit $FAILED"):
        assert check in text, check
