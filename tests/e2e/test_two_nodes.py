"""Two torchrun agents on this machine as two Kubernetes nodes, running the rendered Job's command.

Each "node" runs docker/entrypoint.sh (the image's `dtrain-entrypoint`) with exactly the `args` and
`env` of the Job that `dtrain k8s --cpu --nodes 2` renders; only the places a cluster provides
are substituted: the rendezvous host (127.0.0.1), the ConfigMap file and the claim's run dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
import yaml

from distributed_train.cli import k8s
from distributed_train.cli.k8s_render import CONFIG_PATH, ENTRYPOINT, RDZV_PORT
from tests.helpers import EXACT, REPO, clean_env, free_port

pytestmark = pytest.mark.slow

ENTRYPOINT_SCRIPT = REPO / "docker" / "entrypoint.sh"
# In float64 (train.precision=fp64): results are compared across launchers, restarts and, in
# test_elastic, world sizes (helpers.EXACT).
CONFIG = {"seed": 3, "train": {"max_steps": 40, "batch_size": 32, "lr": 0.002, "precision": "fp64"},
          "checkpoint": {"every_steps": 10}, "log": {"every_steps": 10, "wandb": "disabled"},
          "dist": {"timeout_s": 60}}
# The same digits task, 50 ms slower per step, so a node can be killed in the middle of the run.
SLOW_TASK = """
import time
from distributed_train.tasks.digits import DigitsTask

class SlowDigits(DigitsTask):
    def loss(self, model, batch):
        time.sleep(0.05)
        return super().loss(model, batch)
"""


def rendered_job(tmp_path: Path, config: dict) -> tuple[dict, Path]:
    """The Job `dtrain k8s --cpu --nodes 2` renders for `config`, and its ConfigMap written to a file."""
    user_config = tmp_path / "user.yaml"
    user_config.write_text(yaml.safe_dump(config))
    objects = list(yaml.safe_load_all(k8s.manifests(["--cpu", "--nodes", "2", "--image", "dtrain:test",
                                                     str(user_config)])))
    job = next(o for o in objects if o["kind"] == "Job")
    config_map = next(o for o in objects if o["metadata"]["name"].endswith("-config"))
    mounted = tmp_path / "etc-dtrain" / "config.yaml"  # what the ConfigMap volume holds in a pod
    mounted.parent.mkdir()
    mounted.write_text(config_map["data"]["config.yaml"])
    return job, mounted


def node_command(job: dict, port: int, config_file: Path, run_dir: Path) -> tuple[list[str], dict]:
    """(argv, env) of one pod's container, with the cluster-provided names replaced by local ones."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [ENTRYPOINT]
    swaps = {f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}:{RDZV_PORT}":
             f"127.0.0.1:{port}",
             CONFIG_PATH: str(config_file),
             f"--run_dir=/runs/{job['metadata']['name']}": f"--run_dir={run_dir}"}
    args = [swaps.get(a, a) for a in container["args"]]
    assert len(set(args) & set(swaps.values())) == len(swaps), f"renderer changed its arguments: {args}"
    env = {e["name"]: e["value"] for e in container["env"]}
    # Node 0's DNS name resolves to its own pod; this machine's hostname resolves to itself.
    env.update(DTRAIN_WAIT_FOR_HOST=socket.gethostname(), OMP_NUM_THREADS="1")
    return [str(ENTRYPOINT_SCRIPT), *args], clean_env(**env)


def start_node(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """One node's agent, logging to `log`, with its own TMPDIR beside it (as a machine has its own
    /tmp: what a node that is SIGKILLed leaves there goes with the test's folder)."""
    tmp = log.with_name(f"{log.stem}-tmp")
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen(argv, env={**env, "TMPDIR": str(tmp)}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_nodes(nodes: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    """Wait for every node; on failure or timeout kill them all and show every node's output."""
    deadline = time.monotonic() + timeout
    try:
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)
    codes = [n.returncode for n in nodes]
    output = "\n".join(f"--- node {i} (exit {c}) ---\n{log.read_text()}" for i, (c, log) in
                       enumerate(zip(codes, logs)))
    assert codes == [0] * len(nodes), output


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit():
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_node(node: subprocess.Popen) -> None:
    """What losing a machine does: SIGKILL the agent's process group and every worker under it."""
    victims = _descendants(node.pid)
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait(timeout=10)


def wait_for_port(port: int, timeout: float = 30) -> None:
    """Until node 0's agent listens on the rendezvous port (so node 0 hosts the store, as in the Job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"no rendezvous store on port {port} after {timeout}s")


def final_parameters(run_dir: Path) -> dict:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=EXACT, msg=f"parameter {key} differs")


@contextlib.contextmanager
def background_run(argv: list[str], run_dir: Path, log: Path) -> Iterator[Callable[[], dict]]:
    """Start `argv` now, so that it runs beside the tests that follow; yields a function that waits
    for it and returns its final parameters. Still running at the end: killed with its workers."""
    proc = start_node(argv, clean_env(OMP_NUM_THREADS="1"), log)

    def parameters() -> dict:
        wait_nodes([proc], [log], timeout=120)
        return final_parameters(run_dir)

    try:
        yield parameters
    finally:
        if proc.poll() is None:
            kill_node(proc)


@pytest.fixture(scope="module")
def launch_reference(tmp_path_factory):
    """`dtrain launch --nproc-per-node 2` of CONFIG, started now so it runs beside the first test."""
    directory = tmp_path_factory.mktemp("launch")
    (directory / "user.yaml").write_text(yaml.safe_dump(CONFIG))
    with background_run(["python3", "-m", "distributed_train", "launch", "--nproc-per-node", "2",
                         str(directory / "user.yaml"), f"--run_dir={directory / 'run'}"],
                        directory / "run", directory / "launch.log") as parameters:
        yield parameters


def test_rendered_job_on_two_agents_matches_dtrain_launch(tmp_path, launch_reference):
    job, config_file = rendered_job(tmp_path, CONFIG)
    port = free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    argv, env = node_command(job, port, config_file, tmp_path / "two-nodes")
    nodes = [start_node(argv, env, logs[0])]
    wait_for_port(port)
    nodes.append(start_node(argv, env, logs[1]))
    wait_nodes(nodes, logs, timeout=120)

    summary = json.loads((tmp_path / "two-nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 40
    assert_same_parameters(final_parameters(tmp_path / "two-nodes"), launch_reference())


def test_killed_node_restarts_and_the_job_completes(tmp_path, launch_reference):
    task_file = tmp_path / "slow_digits.py"
    task_file.write_text(SLOW_TASK)
    job, config_file = rendered_job(tmp_path, {**CONFIG, "task": f"{task_file}:SlowDigits"})
    port = free_port()
    run_dir = tmp_path / "run"
    argv, env = node_command(job, port, config_file, run_dir)
    logs = [tmp_path / "node0.log", tmp_path / "node1.log", tmp_path / "node1-restarted.log"]
    node0 = start_node(argv, env, logs[0])
    wait_for_port(port)
    node1 = start_node(argv, env, logs[1])

    deadline = time.monotonic() + 90
    while not list(run_dir.glob("checkpoints/step-*/COMMITTED")):
        assert time.monotonic() < deadline and node0.poll() is None and node1.poll() is None, \
            "no checkpoint committed:\n" + "\n".join(log.read_text() for log in logs[:2])
        time.sleep(0.05)
    kill_node(node1)  # the Job controller would now start a new pod for index 1
    assert not (run_dir / "summary.json").exists(), "the run finished before a node could be killed"
    node1_again = start_node(argv, env, logs[2])
    wait_nodes([node0, node1_again], [logs[0], logs[2]], timeout=120)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 40 and summary["world_size"] == 2
    assert summary["resumed_from"], f"the restarted job did not resume from a checkpoint: {summary}"
    # Resume is exact: the interrupted run ends where the uninterrupted one does (same math, slower task).
    assert_same_parameters(final_parameters(run_dir), launch_reference())


def test_dtrain_launch_takes_its_node_layout_from_the_runtimes_pet_variables(tmp_path, launch_reference):
    """Two agents configured only by PET_* variables, as a TrainJob's torch runtime sets them."""
    config = tmp_path / "user.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    port = free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = []
    for rank in (0, 1):
        env = clean_env(PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(rank),
                        PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        nodes.append(start_node(["python3", "-m", "distributed_train", "launch", str(config),
                                 f"--run_dir={tmp_path / 'run'}"], env, logs[rank]))
    wait_nodes(nodes, logs, timeout=120)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 40
    assert_same_parameters(final_parameters(tmp_path / "run"), launch_reference())
