"""The image, built for real (podman, docker/Dockerfile's cpu target) and run as the manifests run it.

The image is built once per source state and reused (tests/podman_image.py); every container runs
with the options that the pod `dtrain k8s` renders translates to (tests/containers/pods.py): the
image's non-root user, a read-only root, all capabilities dropped, no new privileges.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest
import torch
import yaml

from distributed_train.cli.k8s_render import RDZV_PORT
from tests import podman_image
from tests.containers import pods
from tests.e2e.test_two_nodes import SLOW_TASK  # the digits task, 50 ms slower per step
from tests.helpers import EXACT, REPO, dtrain, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

USER_ID = 10001
# In float64 (train.precision=fp64): compared across containers, restarts and a host process.
CONFIG = {"seed": 5, "train": {"max_steps": 40, "batch_size": 32, "lr": 0.002, "precision": "fp64"},
          "checkpoint": {"every_steps": 0}, "log": {"every_steps": 5, "wandb": "disabled"},
          "dist": {"timeout_s": 60}}


@pytest.fixture(scope="module")
def image() -> str:
    return podman_image.build("cpu")


def writable_folder(path: Path) -> Path:
    """A host folder the image's user can write: what a volume's fsGroup gives in a pod."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, USER_ID, USER_ID)
    return path


def render(tmp_path: Path, image: str, config: dict, *k8s_args: str) -> tuple[dict, dict]:
    user_config = tmp_path / "user.yaml"
    user_config.write_text(yaml.safe_dump(config))
    return pods.render(["--cpu", "--image", image, *k8s_args, str(user_config)])


def pod_options(job: dict, maps: dict, runs: Path, tmp_path: Path, index: int = 0,
                port: int | None = None) -> list[str]:
    """One pod of `job` as `podman run` options; the rendezvous host resolves to this pod, on `port`."""
    name, subdomain = job["metadata"]["name"], job["spec"]["template"]["spec"]["subdomain"]
    options = pods.run_options(job, maps, {f"{name}-runs": runs}, tmp_path / f"pod-{index}")
    rendezvous = f"{name}-0.{subdomain}:{RDZV_PORT}"
    assert rendezvous in options, f"the Job no longer names its rendezvous endpoint {rendezvous}"
    # Host network: a free port instead of the Service's (other tests may run beside this one).
    options = [f"{name}-0.{subdomain}:{port or free_port()}" if o == rendezvous else o for o in options]
    # Each pod a host of its own (its own loopback address), as the headless Service's DNS makes it.
    hosts = [f"--add-host={name}-{k}.{subdomain}:127.0.0.{k + 2}" for k in range(job["spec"]["completions"])]
    hosts += [f"--add-host={name}-{k}:127.0.0.{k + 2}" for k in range(job["spec"]["completions"])]
    # The pods' interface (eth0) is this machine's loopback, where the containers' addresses are.
    options = ["--env=GLOO_SOCKET_IFNAME=lo" if o == "--env=GLOO_SOCKET_IFNAME=eth0" else o for o in options]
    return [f"--hostname={name}-{index}", f"--env=JOB_COMPLETION_INDEX={index}", *hosts, *options]


def parameters(run_dir: Path) -> dict:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=f"parameter {key} differs")


def wait_exit(name: str, timeout: float) -> int:
    code = podman_image.podman("wait", name, timeout=timeout).stdout.strip()
    return int(code)


def test_the_image_is_what_the_manifests_and_docs_say(image):
    config = json.loads(podman_image.podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == f"{USER_ID}:{USER_ID}"
    assert {"HOME=/tmp", "TMPDIR=/tmp"} <= set(config["Env"])
    assert config["Entrypoint"] == ["/usr/local/bin/dtrain-entrypoint"] and config["WorkingDir"] == "/workspace"
    assert "/workspace/runs" in config["Volumes"]
    job, _ = pods.render(["--cpu", "--image", image])
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["runAsUser"] == USER_ID
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    # The runtime layer carries no installer, headers or test suites; the examples are there.
    listing = podman_image.podman("run", "--rm", "--entrypoint=python", image, "-c", INSPECT).stdout
    assert json.loads(listing) == {"installers": [], "torch_extras": [], "examples": True}


INSPECT = """
import importlib.util, json, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
print(json.dumps({
    "installers": [m for m in ("pip", "setuptools", "wheel") if importlib.util.find_spec(m)],
    "torch_extras": [d for d in ("include", "test") if os.path.exists(os.path.join(site, "torch", d))],
    "examples": os.path.exists("/workspace/examples/digits.yaml")}))
"""


def test_dtrain_doctor_passes_in_the_image(image):
    job, _ = pods.render(["--cpu", "--image", image])
    hardening = pods.security_options(job["spec"]["template"]["spec"])
    out = podman_image.podman("run", "--rm", "--network=host", "--shm-size=2g", *hardening,
                              "--tmpfs=/tmp:rw,exec,mode=1777", "--entrypoint=dtrain", image, "doctor",
                              timeout=300)
    assert "verdict: healthy (2 rank(s)" in out.stdout, out.stdout


def test_no_arguments_trains_the_default_task_on_two_ranks(image, tmp_path):
    """`podman run IMAGE`, hardened as the manifests harden a pod, as the image's non-root user."""
    job, _ = pods.render(["--cpu", "--image", image])
    hardening = pods.security_options(job["spec"]["template"]["spec"])
    runs = writable_folder(tmp_path / "runs")
    out = podman_image.podman("run", "--rm", "--network=host", "--ipc=host", *hardening,
                              "--tmpfs=/tmp:rw,exec,mode=1777", f"--volume={runs}:/workspace/runs", image,
                              timeout=900)
    # Nothing tries to write outside /tmp and the run folder (wandb's cache, torch's, HOME).
    assert "read-only file system" not in out.stderr.lower() and "Traceback" not in out.stderr, out.stderr
    (run_dir,) = runs.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run_dir.name.startswith("digits-") and summary["world_size"] == 2, out.stdout
    assert summary["eval"]["accuracy"] > 0.9, summary
    assert {p.lstat().st_uid for p in run_dir.rglob("*")} == {USER_ID}


def test_the_headers_podman_command_works_as_written(image, tmp_path):
    """docker/Dockerfile's header: `mkdir -p runs && chown 10001:10001 runs`, then its podman line,
    with only the image name and the folder it runs in replaced."""
    header = [line.removeprefix("#").strip() for line in (REPO / "docker" / "Dockerfile").read_text().splitlines()
              if line.startswith("#   ")]
    assert "mkdir -p runs && chown 10001:10001 runs    # the container's user (10001) writes the run folder" in header
    (line,) = [line for line in header if line.startswith("podman run ")]
    argv = [a.replace("$PWD", str(tmp_path)) for a in shlex.split(line)]
    argv = [image if a == "REGISTRY/distributed-train:0.1.0-cpu" else a for a in argv]
    writable_folder(tmp_path / "runs")
    podman_image.podman(*argv[1:], timeout=900)
    summary = json.loads((tmp_path / "runs" / "digits" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["world_size"] == 2, summary


def test_podman_stop_commits_and_the_same_run_resumes_bit_identical(image, tmp_path):
    # The task file at the same path on this machine (where `dtrain k8s` checks it) and in the
    # container (where a user's own image would carry it).
    (tmp_path / "task").mkdir()
    task_file = tmp_path / "task" / "slow_digits.py"
    task_file.write_text(SLOW_TASK)
    task_volume = f"--volume={task_file.parent}:{task_file.parent}:ro"
    config = {**CONFIG, "task": f"{task_file}:SlowDigits", "train": {**CONFIG["train"], "max_steps": 200}}
    job, maps = render(tmp_path, image, config, "--procs-per-node", "2")
    runs = writable_folder(tmp_path / "runs")
    with podman_image.container("dtrain-test-stop") as name:
        podman_image.podman("run", "--detach", f"--name={name}", task_volume, *pod_options(job, maps, runs, tmp_path))
        metrics = runs / job["metadata"]["name"] / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while _last_step(metrics) < 20:
            assert time.monotonic() < deadline, podman_image.podman("logs", name).stderr
            time.sleep(0.2)
        podman_image.podman("stop", "--time=60", name, timeout=120)
        logs = podman_image.podman("logs", name)
        assert wait_exit(name, 60) == 143, logs.stderr
        assert "torch.distributed is disabled" not in logs.stdout + logs.stderr, logs.stderr
    committed = list((runs / job["metadata"]["name"]).glob("checkpoints/*/COMMITTED"))
    assert committed, "podman stop committed no checkpoint"
    with podman_image.container("dtrain-test-stop") as name:
        podman_image.podman("run", f"--name={name}", task_volume, *pod_options(job, maps, runs, tmp_path),
                            timeout=600)
    summary = json.loads((runs / job["metadata"]["name"] / "summary.json").read_text())
    assert summary["resumed_from"] and summary["global_step"] == 200, summary

    reference, reference_maps = render(tmp_path, image, config, "--procs-per-node", "2", "--name", "reference")
    with podman_image.container("dtrain-test-reference") as name:
        podman_image.podman("run", f"--name={name}", task_volume,
                            *pod_options(reference, reference_maps, runs, tmp_path), timeout=600)
    # Bit-identical: the same image, world size and math; only the stop and the resume differ.
    assert_same(parameters(runs / job["metadata"]["name"]), parameters(runs / "reference"), atol=0)


def _last_step(metrics: Path) -> int:
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()
             if line.strip()] if metrics.exists() else []
    return max(steps, default=0)


def test_two_containers_as_two_nodes_equal_one_process(image, tmp_path):
    """The rendered two-node Job: two containers, c10d rendezvous, distinct host names."""
    job, maps = render(tmp_path, image, CONFIG, "--nodes", "2")
    runs = writable_folder(tmp_path / "runs")
    port = free_port()
    names = ["dtrain-test-node0", "dtrain-test-node1"]
    with podman_image.container(names[0]), podman_image.container(names[1]):
        for index, name in enumerate(names):
            podman_image.podman("run", "--detach", f"--name={name}",
                                *pod_options(job, maps, runs, tmp_path, index, port))
        codes = [wait_exit(name, 600) for name in names]
        logs = "\n".join(podman_image.podman("logs", n).stderr[-3000:] for n in names)
        assert codes == [0, 0], logs
    run_dir = runs / job["metadata"]["name"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 40

    config = tmp_path / "user.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    dtrain("train", str(config), f"--run_dir={tmp_path / 'one'}", cwd=REPO, timeout=300)
    assert_same(parameters(run_dir), parameters(tmp_path / "one"), atol=EXACT)
