"""`dtrain slurm` on a real Slurm cluster (tests/slurm_cluster.py: a controller and two nodes on
this host): a 2-node job equals one process; two jobs share the nodes without clashing; a job
stopped with `scancel --signal=TERM` commits a checkpoint, requeues itself (same job id) and
finishes bit-identical to the uninterrupted one."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import EXACT, FP64, REPO, dtrain, max_diff
from tests.slurm_cluster import job_state, slurm_cluster

pytestmark = pytest.mark.slow

JOB = ["--task=tests/tasks/fault_tasks.py:SlowSteps", "--task_args.sleep_s=0.1", FP64, "--train.batch_size=8",
       "--train.max_steps=30", "--log.every_steps=1", "--log.wandb=disabled"]


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster(nodes=2) as env:
        yield {**os.environ, "SLURM_CONF": env["SLURM_CONF"], "folder": env["folder"]}


def _submit(env: dict, tmp_path: Path, name: str, *extra: str) -> str:
    proc = dtrain("slurm", "--nodes", "2", "--procs-per-node", "1", "--job-name", name,
                  f"--output={tmp_path}/{name}-%j.out", "--signal-before=60", *JOB, *extra,
                  f"--run_dir={tmp_path / name}", "--submit", cwd=REPO, env=env, timeout=60)
    assert proc.stdout.startswith("submitted Slurm job "), proc.stdout
    return proc.stdout.split()[-1]


def _wait_for(env: dict, job: str, states: set[str], tmp_path: Path, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state, _ = job_state(env, job)
        if state in states:
            return state
        if time.monotonic() > deadline or state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"} - states:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.out"))
            show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
            controller = (Path(env["folder"]) / "slurmctld.log").read_text()[-3000:]
            raise AssertionError(f"job {job} is {state or 'gone'}, waited for {states}\n{logs}\n{show}\n{controller}")
        time.sleep(0.5)


def _steps_alive(job: str) -> bool:
    """A slurmstepd of the job still runs on this host (every node of the test cluster is here)."""
    return subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], stdout=subprocess.DEVNULL).returncode == 0


def _started_training(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(json.loads(line).get("kind") == "train" for line in path.read_text().splitlines()
                                 if line.strip())


def test_two_jobs_share_the_nodes_and_a_stopped_one_requeues_and_finishes_bit_identical(cluster, tmp_path):
    reference = dtrain("train", *JOB, f"--run_dir={tmp_path / 'one'}", cwd=REPO, timeout=180)
    assert reference.returncode == 0
    whole = _submit(cluster, tmp_path, "whole")
    stopped = _submit(cluster, tmp_path, "stopped")  # both at once on the same two nodes: other ports
    deadline = time.monotonic() + 180
    while not _started_training(tmp_path / "stopped"):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", stopped], env=cluster, check=True, timeout=30)
    deadline = time.monotonic() + 120
    while job_state(cluster, stopped) != ("PENDING", 1) or _steps_alive(stopped):
        # Requeued, and every process of its first run gone: started sooner, it fails at once.
        assert time.monotonic() < deadline, job_state(cluster, stopped)
        time.sleep(0.2)
    # A requeued job waits about two minutes (BeginTime) before it may start again.
    subprocess.run(["scontrol", "update", f"jobid={stopped}", "StartTime=now"], env=cluster, check=True, timeout=30)
    _wait_for(cluster, whole, {"COMPLETED"}, tmp_path)
    _wait_for(cluster, stopped, {"COMPLETED"}, tmp_path)
    assert job_state(cluster, stopped)[1] == 1  # requeued once, same job id

    log = next(tmp_path.glob(f"stopped-{stopped}.out")).read_text()
    assert "stopped by SIGTERM after step" in log and "rerun the same command to continue" in log, log
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["resumed_from"] and (summary["world_size"], summary["global_step"]) == (2, 30), summary
    state = {name: torch.load(tmp_path / name / "final_model.pt", weights_only=True)
             for name in ("one", "whole", "stopped")}
    assert all(torch.equal(state["stopped"][k], state["whole"][k]) for k in state["whole"])
    assert max_diff(state["whole"], state["one"]) <= EXACT
