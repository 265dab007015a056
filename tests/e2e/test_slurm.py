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


def _finish(env: dict, job: str, tmp_path: Path, timeout: float = 300) -> int:
    """Wait until `job` completed; each time it is requeued, start it as soon as its previous run's
    processes are gone (Slurm would hold it about two minutes). Returns its restart count."""
    deadline = time.monotonic() + timeout
    while True:
        state, restarts = job_state(env, job)
        if state == "COMPLETED":
            return restarts
        if state == "PENDING" and restarts and not _steps_alive(job):
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"} or time.monotonic() > deadline:
            _wait_for(env, job, {"COMPLETED"}, tmp_path, timeout=0)  # raises with the logs
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


def test_the_time_limit_signal_stops_with_a_checkpoint_and_the_requeued_job_finishes_exactly(cluster, tmp_path):
    """--time=1 (minute) and USR1 30 s before it: the script turns USR1 into TERM on every node. 400
    steps of at least 0.1 s each cannot finish in the 30 s before the signal, however fast the machine."""
    reference = dtrain("train", *JOB, "--task=tests/tasks/toy.py:Regression", "--train.max_steps=400",
                       f"--run_dir={tmp_path / 'one'}", cwd=REPO, timeout=180)  # the same math, without the sleep
    assert reference.returncode == 0
    job = _submit(cluster, tmp_path, "limited", "--time=1", "--signal-before=30", "--train.max_steps=400")
    restarts = _finish(cluster, job, tmp_path)
    log = (tmp_path / f"limited-{job}.out").read_text()
    assert restarts >= 1 and f"dtrain slurm: stopping job {job} with a checkpoint" in log, log
    assert "stopped by SIGTERM after step" in log and "DUE TO TIME LIMIT" not in log, log
    summary = json.loads((tmp_path / "limited" / "summary.json").read_text())
    assert summary["resumed_from"] and summary["global_step"] == 400
    state = torch.load(tmp_path / "limited" / "final_model.pt", weights_only=True)
    assert max_diff(state, torch.load(tmp_path / "one" / "final_model.pt", weights_only=True)) <= EXACT


def test_a_node_set_down_mid_run_requeues_the_job_which_resumes_from_its_last_checkpoint_exactly(cluster, tmp_path):
    # 80 steps of at least 0.1 s: the job is still running when the node goes down, however fast.
    reference = dtrain("train", *JOB, "--task=tests/tasks/toy.py:Regression", "--train.max_steps=80",
                       f"--run_dir={tmp_path / 'one'}", cwd=REPO, timeout=180)
    assert reference.returncode == 0
    job = _submit(cluster, tmp_path, "lost", "--checkpoint.every_steps=5", "--train.max_steps=80")
    deadline = time.monotonic() + 180
    while not list((tmp_path / "lost" / "checkpoints").glob("step-*/COMMITTED")):
        assert time.monotonic() < deadline, "no checkpoint was committed"
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", "nodename=n2", "state=down", "reason=dtrain-test"], env=cluster,
                   check=True, timeout=30)  # as a node failure would: the job is requeued
    try:
        deadline = time.monotonic() + 60
        while job_state(cluster, job)[1] == 0:
            assert time.monotonic() < deadline, job_state(cluster, job)
            time.sleep(0.2)
    finally:
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], env=cluster, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _finish(cluster, job, tmp_path) >= 1
    summary = json.loads((tmp_path / "lost" / "summary.json").read_text())
    assert summary["resumed_from"] and (summary["world_size"], summary["global_step"]) == (2, 80), summary
    state = torch.load(tmp_path / "lost" / "final_model.pt", weights_only=True)
    assert max_diff(state, torch.load(tmp_path / "one" / "final_model.pt", weights_only=True)) <= EXACT


def test_a_job_sbatch_refuses_is_one_line_and_exit_2(cluster, tmp_path):
    proc = dtrain("slurm", "--partition", "nope", "--submit", *JOB, f"--run_dir={tmp_path / 'x'}", cwd=REPO,
                  env=cluster, check=False, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.strip().splitlines()[-1].startswith("dtrain: error: sbatch refused the job: "), proc.stderr
    assert "partition" in proc.stderr.lower(), proc.stderr


def test_a_malformed_node_list_in_a_step_is_one_line_and_exit_2(tmp_path):
    from tests.helpers import clean_env

    env = {**clean_env(), "SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "n[1-"}
    proc = dtrain("launch", *JOB, f"--run_dir={tmp_path / 'x'}", cwd=REPO, env=env, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["dtrain: error: SLURM_STEP_NODELIST='n[1-' is not a Slurm host list: "
                                                "unbalanced brackets"], proc.stderr


def test_status_logs_and_a_graceful_cancel_of_a_running_job(cluster, tmp_path):
    job = _submit(cluster, tmp_path, "tocancel", "--train.max_steps=2000")
    deadline = time.monotonic() + 180
    while not _started_training(tmp_path / "tocancel"):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.2)
    status = dtrain("slurm", "status", job, cwd=REPO, env=cluster, timeout=60).stdout
    assert status.startswith(f"job {job} (tocancel): RUNNING, nodes n[1-2], restarts 0") and \
        f"run_dir {tmp_path / 'tocancel'}, last committed step -" in status, status
    cancelled = dtrain("slurm", "cancel", job, cwd=REPO, env=cluster, timeout=300).stdout
    assert cancelled.startswith(f"cancelled Slurm job {job}; its last committed checkpoint is step "), cancelled
    step = int(cancelled.split("step ")[1].split()[0])
    assert job_state(cluster, job)[0] in ("CANCELLED", "")  # gone from the queue: not requeued
    assert (tmp_path / "tocancel" / "checkpoints" / f"step-{step:08d}" / "COMMITTED").is_file()
    log = dtrain("slurm", "logs", job, cwd=REPO, env=cluster, timeout=60).stdout
    assert f"stopped by SIGTERM after step {step}; rerun the same command to continue" in log, log
    unknown = dtrain("slurm", "status", "999999", cwd=REPO, env=cluster, check=False, timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.startswith("dtrain: error: Slurm job '999999': "), unknown.stderr
