"""Elastic membership: `dtrain launch --nnodes 1:2` agents on this machine as two nodes.

Shrink: one node is lost for good (its agent and its worker SIGKILLed); the other re-forms the
group at world size 1, resumes from the last committed checkpoint and finishes. Grow: a second
node joins a running one-node job; the group re-forms at world size 2 at the next restart. Both
end with the parameters of one uninterrupted process: the data position in a checkpoint does not
depend on the world size and the global batch is the same on any world size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_two_nodes import (
    CONFIG,
    SLOW_TASK,
    assert_same_parameters,
    background_run,
    final_parameters,
    kill_node,
    start_node,
    wait_for_port,
    wait_nodes,
)
from tests.helpers import clean_env, free_port

pytestmark = pytest.mark.slow

ELASTIC_CONFIG = {**CONFIG, "train": {**CONFIG["train"], "max_steps": 30}, "checkpoint": {"every_steps": 5}}
# A lost node leaves the rendezvous when it has missed heartbeats for keep_alive_interval x
# keep_alive_max_attempt seconds (torch's default 5 x 3); then the last call waits last_call_timeout
# (default 30) for more nodes. Shorter settings re-form faster; docs/kubernetes.md has the numbers.
RDZV_CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"
# Alone, this task pauses after step 8 until its agent stops it (SIGTERM) to let a joining node
# in, so the join happens mid-run however long the second node takes to start on a loaded machine.
WAITING_TASK = """
import os, signal, time
from distributed_train.tasks.digits import DigitsTask

class WaitsForSecondNode(DigitsTask):
    calls, stopping = 0, False

    def loss(self, model, batch):
        cls = type(self)
        if cls.calls == 0:  # inside the trainer's SIGTERM handler: chain it
            previous = signal.getsignal(signal.SIGTERM)
            def note(signum, frame):
                cls.stopping = True
                if callable(previous):
                    previous(signum, frame)
            signal.signal(signal.SIGTERM, note)
        cls.calls += 1
        deadline = time.monotonic() + 60
        while os.environ["WORLD_SIZE"] == "1" and cls.calls > 8 and not cls.stopping:
            assert time.monotonic() < deadline, "no second node joined"
            time.sleep(0.05)
        return super().loss(model, batch)
"""


@pytest.fixture
def processes():
    """Every agent a test starts; killed with all its workers at the end, whatever happened."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kill_node(proc)


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory):
    """The same run as one uninterrupted process (`dtrain train`), started now, beside the first test."""
    directory = tmp_path_factory.mktemp("reference")
    (directory / "user.yaml").write_text(yaml.safe_dump(ELASTIC_CONFIG))
    with background_run(["python3", "-m", "distributed_train", "train", str(directory / "user.yaml"),
                         f"--run_dir={directory / 'run'}"], directory / "run", directory / "train.log") as parameters:
        yield parameters


def elastic_agent(tmp_path: Path, port: int, task: str = f"{SLOW_TASK}\nTask = SlowDigits\n") -> list[str]:
    """One node's command: an elastic c10d rendezvous on this machine, restarts allowed."""
    task_file = tmp_path / "elastic_task.py"
    task_file.write_text(task)
    config = tmp_path / "user.yaml"
    config.write_text(yaml.safe_dump({**ELASTIC_CONFIG, "task": f"{task_file}:Task"}))
    return ["python3", "-m", "distributed_train", "launch", "--nnodes", "1:2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic",
            "--rdzv-conf", RDZV_CONF, "--max-restarts", "3", str(config),
            f"--run_dir={tmp_path / 'run'}"]


def start_events(run_dir: Path) -> list[dict]:
    """Every `start` event in metrics.jsonl, one per (re)formed group, in order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("kind") == "start":
            events.append(event)
    return events


def wait_until(condition, agents, logs, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        alive = all(a.poll() is None for a in agents)
        if time.monotonic() > deadline or not alive:
            output = "\n".join(f"--- {log.name} ---\n{log.read_text()}" for log in logs)
            raise AssertionError(f"{what} (alive: {alive}):\n{output}")
        time.sleep(0.05)


def committed_step(run_dir: Path) -> int:
    steps = [int(p.parent.name.split("-")[-1]) for p in run_dir.glob("checkpoints/step-*/COMMITTED")]
    return max(steps, default=0)


def test_lost_node_the_survivor_reforms_at_world_size_1_and_finishes_exactly(tmp_path, processes,
                                                                            one_process_reference):
    port, run_dir = free_port(), tmp_path / "run"
    argv = elastic_agent(tmp_path, port)
    env = clean_env(OMP_NUM_THREADS="1")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    processes.append(start_node(argv, env, logs[0]))
    wait_for_port(port)  # node 0 hosts the rendezvous store
    processes.append(start_node(argv, env, logs[1]))
    def committed_at_world_size_2() -> bool:
        starts = [e for e in start_events(run_dir) if e["world_size"] == 2]
        return bool(starts) and committed_step(run_dir) > starts[-1]["step"]

    wait_until(committed_at_world_size_2, processes, logs, 90, "no checkpoint committed at world size 2")

    lost_at = time.time()
    kill_node(processes[1])  # the machine is gone: its agent and its worker, for good
    assert not (run_dir / "summary.json").exists(), "the run finished before a node could be lost"
    wait_nodes([processes[0]], logs[:1], timeout=90)

    starts = start_events(run_dir)
    reformed = next(e for e in starts if e["time"] > lost_at)
    print(f"re-formed at world size 1 in {reformed['time'] - lost_at:.1f} s after the node was lost")
    assert reformed["world_size"] == 1 and reformed["resumed"] and reformed["step"] >= 5
    # What ended the wait, not how long it took (a loaded machine can take any time): the survivor's
    # worker named the lost rank, and its agent re-formed the group and resumed the last commit.
    survivor = logs[0].read_text()
    # its collective failed naming rank 1 ("died", or "did not arrive" when its last heartbeat is
    # read before the kill is noticed), and the restarted worker resumed the last commit
    assert any(line.startswith("dtrain: error: rank 0: ") and "rank 1 " in line for line in survivor.splitlines())
    assert f"resuming from {run_dir}/checkpoints/step-" in survivor, survivor
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 30 and summary["world_size"] == 1 and summary["resumed_from"]
    assert_same_parameters(final_parameters(run_dir), one_process_reference())


def test_a_joining_node_grows_the_group_at_the_next_restart_and_the_result_is_exact(tmp_path, processes,
                                                                                    one_process_reference):
    port, run_dir = free_port(), tmp_path / "run"
    argv = elastic_agent(tmp_path, port, f"{WAITING_TASK}\nTask = WaitsForSecondNode\n")
    env = clean_env(OMP_NUM_THREADS="1")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    processes.append(start_node(argv, env, logs[0]))
    wait_until(lambda: committed_step(run_dir) >= 5, processes, logs[:1], 90,
               "the one-node job committed no checkpoint")
    assert [e["world_size"] for e in start_events(run_dir)] == [1]

    joined_at = time.time()
    processes.append(start_node(argv, env, logs[1]))  # a new machine arrives
    wait_nodes(processes, logs, timeout=90)

    starts = start_events(run_dir)
    grown = next(e for e in starts if e["time"] > joined_at)
    print(f"grew to world size 2 in {grown['time'] - joined_at:.1f} s after the node started")
    assert grown["world_size"] == 2 and grown["resumed"] and grown["step"] >= 5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 30 and summary["world_size"] == 2
    assert_same_parameters(final_parameters(run_dir), one_process_reference())
