"""Kubernetes objects for a multi-node job, as plain dicts: `dtrain k8s` validates and prints them.

The engine is torchrun's c10d rendezvous on node 0 (`<job>-0.<svc>:29400`) and Kubernetes'
Indexed Job; nothing here runs at training time. Restarts resume because run_dir is on a
PersistentVolumeClaim and `checkpoint.resume=auto` is the default.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

import yaml

from distributed_train.errors import UsageError

RDZV_PORT = 29400
CONFIG_DIR = "/etc/dtrain"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
RUNS_DIR = "/runs"
CONTAINER = "trainer"
ENTRYPOINT = "dtrain-entrypoint"  # docker/entrypoint.sh in the image: waits for DNS, then `dtrain launch`
USER_ID = 1000  # the image's non-root user; fsGroup makes the PVC writable for it
MAX_NAME = 50  # leaves room for "-worker-NN" and "-runs" inside a 63-character label
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_EXIT_BAD_CONFIG = 2  # errors.EXIT_USAGE: retrying cannot fix it


@dataclass
class JobSpec:
    """What `dtrain k8s` was asked for; checks every value and names the flag to change."""

    image: str
    nodes: int = 1
    gpus_per_node: int = 1
    procs_per_node: int = 1  # CPU mode only; with GPUs it is one process per GPU
    cpu: bool = False
    name: str = "dtrain"
    kind: str = "job"
    max_restarts: int = 3
    grace_period_s: int = 120
    pvc: str | None = None  # an existing claim; None renders `<name>-runs`
    pvc_size: str = "20Gi"
    pvc_access_mode: str | None = None
    storage_class: str | None = None
    cpus_per_node: str | None = None
    memory_per_node: str | None = None
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise UsageError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise UsageError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.procs_per_node < 1:
            raise UsageError(f"--procs-per-node must be >= 1, got {self.procs_per_node}")
        if self.max_restarts < 0:
            raise UsageError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.grace_period_s < 30:
            raise UsageError(f"--grace-period must be >= 30 seconds (time to save a checkpoint), "
                             f"got {self.grace_period_s}")
        if self.gpus_per_node == 0:
            self.cpu = True
        elif self.cpu:
            raise UsageError("--cpu renders a job without GPUs: drop --gpus-per-node (or drop --cpu)")
        check_name(self.name)
        check_image(self.image)
        if self.pvc is not None and not _DNS_LABEL.match(self.pvc):
            raise UsageError(f"--pvc {self.pvc!r} is not a valid claim name: lowercase letters, digits, '-'")
        if self.pvc_access_mode not in (None, "ReadWriteOnce", "ReadWriteMany"):
            raise UsageError(f"--pvc-access-mode must be ReadWriteOnce or ReadWriteMany, "
                             f"got {self.pvc_access_mode!r}")

    @property
    def nproc_per_node(self) -> int:
        return self.procs_per_node if self.cpu else self.gpus_per_node

    @property
    def rdzv_host(self) -> str:
        """Node 0's DNS name: the Job's pod hostname under the headless Service, or the operator's."""
        return f"{self.name}-worker-0" if self.kind == "pytorchjob" else f"{self.name}-0.{self.name}"

    @property
    def backoff_limit(self) -> int:
        """Pod failures the Job tolerates: a lost node 0 takes every node's agent down once, max_restarts times."""
        return self.nodes * max(1, self.max_restarts)

    @property
    def claim_name(self) -> str:
        return self.pvc or f"{self.name}-runs"

    @property
    def run_dir(self) -> str:
        return f"{RUNS_DIR}/{self.name}"


def check_name(name: str) -> None:
    """Raise UsageError unless `name` is a DNS-1123 label short enough for the derived names."""
    if not _DNS_LABEL.match(name) or len(name) > MAX_NAME:
        raise UsageError(f"--name {name!r} is not a DNS-1123 label: use lowercase letters, digits and '-', "
                         f"starting and ending with a letter or digit, at most {MAX_NAME} characters")


def check_image(image: str) -> None:
    """Raise UsageError unless `image` names a tag (not `latest`) or a digest: every node runs the same code."""
    if "@" in image:
        return
    prefix, _, last = image.rpartition("/")
    repository, _, tag = last.partition(":")
    if not tag or tag == "latest":
        example = f"{prefix + '/' if prefix else ''}{repository}:0.1.0"
        raise UsageError(f"--image {image!r} needs a fixed tag or digest (e.g. {example}): "
                         "with no tag or `latest`, restarted nodes may pull different code")


def container_args(spec: JobSpec) -> list[str]:
    """The container's arguments after the entrypoint: torchrun options, the config, overrides."""
    return [
        "--nnodes", str(spec.nodes),
        "--nproc-per-node", str(spec.nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{spec.rdzv_host}:{RDZV_PORT}",
        "--rdzv-id", spec.name,
        "--max-restarts", str(spec.max_restarts),
        # torchrun's SIGKILL must come after the workers' SIGTERM checkpoint, before Kubernetes' own.
        "--shutdown-timeout", str(spec.grace_period_s - 15),
        CONFIG_PATH,
        f"--run_dir={spec.run_dir}",
        *spec.overrides,
    ]


def container_env(spec: JobSpec) -> list[dict]:
    """Variables the entrypoint and torchrun need (NCCL/gloo settings come from the env ConfigMap)."""
    env = [
        # Restarts must not reuse the agent's rendezvous store (pytorch/pytorch#135712).
        {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"},
        {"name": "DTRAIN_WAIT_FOR_HOST", "value": spec.rdzv_host},
    ]
    cpus = _cpu_request(spec)
    if cpus.isdigit():  # else `dtrain launch` would split every core of the machine, not the request
        env.append({"name": "OMP_NUM_THREADS", "value": str(max(1, int(cpus) // spec.nproc_per_node))})
    return env


def _labels(spec: JobSpec) -> dict:
    return {"app.kubernetes.io/name": "distributed-train", "app.kubernetes.io/instance": spec.name}


def _cpu_request(spec: JobSpec) -> str:
    return spec.cpus_per_node or (str(spec.procs_per_node) if spec.cpu else str(8 * spec.gpus_per_node))


def _resources(spec: JobSpec) -> dict:
    cpus = _cpu_request(spec)
    memory = spec.memory_per_node or (f"{2 * spec.procs_per_node}Gi" if spec.cpu
                                      else f"{32 * spec.gpus_per_node}Gi")
    resources: dict[str, Any] = {"requests": {"cpu": cpus, "memory": memory}, "limits": {"memory": memory}}
    if not spec.cpu:
        resources["requests"]["nvidia.com/gpu"] = spec.gpus_per_node
        resources["limits"]["nvidia.com/gpu"] = spec.gpus_per_node
    return resources


def pod_spec(spec: JobSpec, container_name: str = CONTAINER) -> dict:
    """The pod every node runs: one container, config from a ConfigMap, run_dir on the claim."""
    container = {
        "name": container_name,
        "image": spec.image,
        "command": [ENTRYPOINT],
        "args": container_args(spec),
        "env": container_env(spec),
        "envFrom": [{"configMapRef": {"name": f"{spec.name}-env"}}],
        "ports": [{"name": "pytorchjob-port" if spec.kind == "pytorchjob" else "rdzv",
                   "containerPort": RDZV_PORT}],
        "resources": _resources(spec),
        "securityContext": {"allowPrivilegeEscalation": False},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "runs", "mountPath": RUNS_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    return {
        "terminationGracePeriodSeconds": spec.grace_period_s,
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                            "fsGroup": USER_ID},
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": f"{spec.name}-config"}},
            {"name": "runs", "persistentVolumeClaim": {"claimName": spec.claim_name}},
            # DataLoader workers and NCCL share memory through /dev/shm; the default is 64 MiB.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }


def indexed_job(spec: JobSpec) -> dict:
    """batch/v1 Indexed Job: one pod per node, hostnames `<name>-<index>` under the Service."""
    pod = pod_spec(spec)
    pod.update(restartPolicy="Never", subdomain=spec.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "labels": _labels(spec)},
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,
            "backoffLimit": spec.backoff_limit,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob",
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [_EXIT_BAD_CONFIG]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {"metadata": {"labels": _labels(spec)}, "spec": pod},
        },
    }


def headless_service(spec: JobSpec) -> dict:
    """Gives pod `<name>-<i>` the DNS name `<name>-<i>.<name>`, before it is ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "labels": _labels(spec)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": _labels(spec),
            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}],
        },
    }


def pytorch_job(spec: JobSpec) -> dict:
    """Kubeflow PyTorchJob (kubeflow.org/v1): the operator makes `<name>-worker-<i>` pods and Services."""
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "labels": _labels(spec)},
        "spec": {
            "elasticPolicy": {"rdzvBackend": "c10d", "rdzvPort": RDZV_PORT, "rdzvId": spec.name,
                              "minReplicas": spec.nodes, "maxReplicas": spec.nodes,
                              "maxRestarts": spec.max_restarts},
            "nprocPerNode": str(spec.nproc_per_node),
            "runPolicy": {"backoffLimit": spec.backoff_limit, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {"Worker": {
                "replicas": spec.nodes,
                # Not ExitCode: it would make exit 4 (a peer node was lost) permanent. A bad config
                # (exit 2) fails before any worker starts, so its retries up to backoffLimit are cheap.
                "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": _labels(spec)}, "spec": pod_spec(spec, "pytorch")},
            }},
        },
    }


def config_maps(spec: JobSpec, config_text: str) -> list[dict]:
    """`<name>-config` holds config.yaml; every key of `<name>-env` becomes an environment variable."""
    env = {"GLOO_SOCKET_IFNAME": "eth0"}  # the pod network; gloo may otherwise pick an unroutable one
    if not spec.cpu:
        env.update(NCCL_DEBUG="WARN", NCCL_SOCKET_IFNAME="eth0")
    return [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": f"{spec.name}-config", "labels": _labels(spec)},
         "data": {"config.yaml": config_text}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": f"{spec.name}-env", "labels": _labels(spec)},
         "data": env},
    ]


def run_claim(spec: JobSpec) -> dict:
    """The claim holding run_dir; every node mounts it, so it must be shared (ReadWriteMany)."""
    mode = spec.pvc_access_mode or ("ReadWriteOnce" if spec.cpu else "ReadWriteMany")
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": spec.claim_name, "labels": _labels(spec)},
        "spec": {"accessModes": [mode], "resources": {"requests": {"storage": spec.pvc_size}}},
    }
    if spec.storage_class:
        claim["spec"]["storageClassName"] = spec.storage_class
    return claim


def render(spec: JobSpec, config_text: str) -> list[dict]:
    """Every object to apply, in the order `kubectl apply -f` should create them."""
    objects = config_maps(spec, config_text)
    if spec.pvc is None:
        objects.append(run_claim(spec))
    if spec.kind == "pytorchjob":
        return objects + [pytorch_job(spec)]
    return objects + [headless_service(spec), indexed_job(spec)]


class _IndentedDumper(yaml.SafeDumper):
    """Indent block sequences under their key, as yamllint's default `indent-sequences` wants."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def _literal_str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None  # config.yaml stays readable in the ConfigMap
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_IndentedDumper.add_representer(str, _literal_str)


def to_yaml(objects: list[dict], header: str = "") -> str:
    """One multi-document YAML stream, yamllint-clean, with `header` as leading comment lines."""
    lines = [part for line in header.splitlines()
             for part in textwrap.wrap(line, 76, break_on_hyphens=False, break_long_words=False) or [""]]
    comment = "".join(f"# {line}".rstrip() + "\n" for line in lines)
    body = yaml.dump_all(objects, Dumper=_IndentedDumper, sort_keys=False, explicit_start=True, width=76)
    return comment + body
