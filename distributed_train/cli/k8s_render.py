"""What every kind of manifest shares: the checked request (JobSpec), the node's command and pod.

The engine is torchrun's c10d rendezvous on node 0 and Kubernetes (an Indexed Job, a Kubeflow
TrainJob or the legacy PyTorchJob: k8s_kinds.py); nothing here runs at training time. Restarts
resume because run_dir is on a PersistentVolumeClaim and `checkpoint.resume=auto` is the default.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

import yaml

from distributed_train.cli import k8s_security as security
from distributed_train.errors import UsageError
from distributed_train.storage import has_credentials, is_url

RDZV_PORT = 29400
CONFIG_DIR = "/etc/dtrain"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
RUNS_DIR = "/runs"
CONTAINER = "trainer"
ENTRYPOINT = "dtrain-entrypoint"  # docker/entrypoint.sh in the image: waits for DNS, then `dtrain launch`
KINDS = ("job", "trainjob", "pytorchjob")
TRAINJOB_NODE = "node"  # the torch runtime's replicated job and container name: pods `<job>-node-0-<i>`
MAX_NAME = 50  # leaves room for "-worker-NN" and "-runs" inside a 63-character label
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_EXIT_BAD_CONFIG = 2  # errors.EXIT_USAGE: retrying cannot fix it


@dataclass
class JobSpec:
    """What `dtrain k8s` was asked for; checks every value and names the flag to change."""

    image: str
    nodes: int | str = 1  # N, or MIN:MAX (torchrun's elastic range); becomes the maximum
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
    runtime: str = "torch-distributed"  # TrainJob only: the ClusterTrainingRuntime
    namespace: str | None = None  # None: kubectl's current namespace
    queue: str | None = None  # Kueue LocalQueue
    priority_class: str | None = None
    rdma: str | None = None  # RESOURCE=COUNT of an RDMA device plugin: requested, plus IPC_LOCK
    nccl_socket_ifname: str | None = None  # None: NCCL picks its interface itself
    run_dir_url: str | None = None  # a bucket as run_dir: no claim; each pod works in an emptyDir
    storage_secret: str | None = None  # a Secret whose keys become the pods' environment (credentials)
    overrides: list[str] = field(default_factory=list)
    min_nodes: int = field(init=False)

    def __post_init__(self) -> None:
        self.min_nodes, self.nodes = parse_nodes(self.nodes)
        if self.kind not in KINDS:
            raise UsageError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "trainjob" and self.elastic:
            raise UsageError("--nodes MIN:MAX needs --kind job or pytorchjob: a TrainJob has a fixed "
                             "numNodes (its JobSet restarts every pod when one fails)")
        if self.gpus_per_node < 0:
            raise UsageError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.procs_per_node < 1:
            raise UsageError(f"--procs-per-node must be >= 1, got {self.procs_per_node}")
        if self.rdma is not None:
            self.rdma_resource()  # validates RESOURCE=COUNT
        if self.nccl_socket_ifname is not None and not re.fullmatch(r"\^?=?[\w.,:-]+", self.nccl_socket_ifname):
            raise UsageError(f"--nccl-socket-ifname must be an interface name or NCCL prefix list "
                             f"(e.g. eth0, ^lo,docker), got {self.nccl_socket_ifname!r}")
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
        for flag, value in [("--pvc-size", self.pvc_size), ("--cpus-per-node", self.cpus_per_node),
                            ("--memory-per-node", self.memory_per_node)]:
            check_quantity(flag, value)
        if self.pvc is not None and not _DNS_LABEL.match(self.pvc):
            raise UsageError(f"--pvc {self.pvc!r} is not a valid claim name: lowercase letters, digits, '-'")
        if self.pvc_access_mode not in (None, "ReadWriteOnce", "ReadWriteMany"):
            raise UsageError(f"--pvc-access-mode must be ReadWriteOnce or ReadWriteMany, "
                             f"got {self.pvc_access_mode!r}")
        self._check_bucket()
        for flag, value in [("--namespace", self.namespace), ("--runtime", self.runtime)]:
            if value is not None and (not _DNS_LABEL.match(value) or len(value) > 63):
                raise UsageError(f"{flag} {value!r} is not a DNS-1123 label: lowercase letters, digits, '-'")
        for flag, value in [("--queue", self.queue), ("--priority-class", self.priority_class)]:
            if value is not None and not _LABEL_VALUE.match(value):
                raise UsageError(f"{flag} {value!r} is not a valid label value: letters, digits, "
                                 "'-', '_', '.', at most 63 characters")

    def _check_bucket(self) -> None:
        """--run-dir-url is a URL without credentials and replaces the claim; --storage-secret a Secret name."""
        if self.run_dir_url is not None:
            if not is_url(self.run_dir_url) or has_credentials(self.run_dir_url):
                raise UsageError(f"--run-dir-url must be a bucket's URL without credentials (e.g. "
                                 f"s3://bucket/runs/NAME), got {self.run_dir_url!r}")
            if self.pvc is not None or self.storage_class is not None or self.pvc_access_mode is not None:
                raise UsageError("--run-dir-url puts run_dir in a bucket: drop --pvc, --storage-class and "
                                 "--pvc-access-mode (no claim is rendered)")
        if self.storage_secret is not None and not _DNS_SUBDOMAIN.match(self.storage_secret):
            raise UsageError(f"--storage-secret {self.storage_secret!r} is not a Secret name: lowercase "
                             "letters, digits, '-' and '.'")

    def rdma_resource(self) -> tuple[str, int] | None:
        """(resource name, count) of `--rdma RESOURCE=COUNT`, e.g. rdma/hca_shared_devices_a=1."""
        if self.rdma is None:
            return None
        name, _, count = self.rdma.partition("=")
        if not re.fullmatch(r"[a-z0-9.-]+/[A-Za-z0-9_.-]+", name) or not count.isdigit() or int(count) < 1:
            raise UsageError(f"--rdma must be RESOURCE=COUNT with a device-plugin resource name and a "
                             f"count >= 1 (e.g. rdma/hca_shared_devices_a=1), got {self.rdma!r}")
        return name, int(count)

    @property
    def elastic(self) -> bool:
        return self.min_nodes != self.nodes

    @property
    def nnodes(self) -> str:
        """torchrun's --nnodes: N, or MIN:MAX."""
        return f"{self.min_nodes}:{self.nodes}" if self.elastic else str(self.nodes)

    @property
    def nproc_per_node(self) -> int:
        return self.procs_per_node if self.cpu else self.gpus_per_node

    @property
    def rdzv_host(self) -> str:
        """Node 0's DNS name under the headless Service of the Job, the JobSet, or the operator."""
        if self.kind == "pytorchjob":
            return f"{self.name}-worker-0"
        if self.kind == "trainjob":
            return f"{self.name}-{TRAINJOB_NODE}-0-0.{self.name}"
        return f"{self.name}-0.{self.name}"

    @property
    def backoff_limit(self) -> int:
        """Pod failures the Job tolerates: a lost node 0 takes every node's agent down once, max_restarts times."""
        return self.nodes * max(1, self.max_restarts)

    @property
    def claim_name(self) -> str:
        return self.pvc or f"{self.name}-runs"

    @property
    def run_dir(self) -> str:
        return self.run_dir_url or f"{RUNS_DIR}/{self.name}"


def check_name(name: str) -> None:
    """Raise UsageError unless `name` is a DNS-1123 label short enough for the derived names."""
    if not _DNS_LABEL.match(name) or len(name) > MAX_NAME:
        raise UsageError(f"--name {name!r} is not a DNS-1123 label: use lowercase letters, digits and '-', "
                         f"starting and ending with a letter or digit, at most {MAX_NAME} characters")


def parse_nodes(nodes: int | str) -> tuple[int, int]:
    """(minimum, maximum) from `--nodes N` or `--nodes MIN:MAX`."""
    text = str(nodes)
    low, _, high = text.partition(":")
    try:
        minimum, maximum = int(low), int(high or low)
    except ValueError:
        raise UsageError(f"--nodes must be N or MIN:MAX (whole numbers), got {text!r}") from None
    if minimum < 1 or maximum < minimum:
        raise UsageError(f"--nodes must be >= 1 with MIN <= MAX, got {text!r}")
    return minimum, maximum


# An image reference as registries parse it: [host[:port]/]path[:tag][@algorithm:hex].
_IMAGE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]+)?/)?"
                    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                    r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")
# A Kubernetes resource quantity (`8`, `500m`, `32Gi`, `1e3`).
_QUANTITY = re.compile(r"(?:\d+(?:\.\d+)?|\.\d+)(?:Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")


def check_quantity(flag: str, value: str | None) -> None:
    """Raise UsageError unless `value` is a positive Kubernetes quantity (None: not given)."""
    if value is not None and (not _QUANTITY.fullmatch(value) or not re.search(r"[1-9]", value.split("e")[0])):
        raise UsageError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 8, 500m, 32Gi)")


def check_image(image: str) -> None:
    """Raise UsageError unless `image` names a tag (not `latest`) or a digest: every node runs the same code."""
    if not _IMAGE.fullmatch(image):
        raise UsageError(f"--image {image!r} is not an image reference (e.g. registry.example.com/team/dtrain:0.1.0)")
    if "@" in image:
        return
    prefix, _, last = image.rpartition("/")
    repository, _, tag = last.partition(":")
    if not tag or tag == "latest":
        example = f"{prefix + '/' if prefix else ''}{repository}:0.1.0"
        raise UsageError(f"--image {image!r} needs a fixed tag or digest (e.g. {example}): "
                         "with no tag or `latest`, restarted nodes may pull different code")


def container_args(spec: JobSpec) -> list[str]:
    """The container's arguments after the entrypoint: torchrun options, the config, overrides.

    A TrainJob's runtime sets PET_NNODES and PET_NPROC_PER_NODE from numNodes / numProcPerNode,
    which torchrun reads as its defaults, so the count lives in one place there."""
    counts = [] if spec.kind == "trainjob" else \
        ["--nnodes", spec.nnodes, "--nproc-per-node", str(spec.nproc_per_node)]
    return [
        *counts,
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{spec.rdzv_host}:{RDZV_PORT}",
        "--rdzv-id", spec.name,
        "--max-restarts", str(spec.max_restarts),
        # torchrun's SIGKILL must come after the workers' SIGTERM checkpoint, before Kubernetes' own.
        "--shutdown-timeout", str(spec.grace_period_s - 15),
        CONFIG_PATH,
        f"--run_dir={spec.run_dir}",
        # The kubelet expands $(VAR) in args: $$( keeps an override's text as the user wrote it.
        *(override.replace("$(", "$$(") for override in spec.overrides),
    ]


def container_env(spec: JobSpec) -> list[dict]:
    """Variables the entrypoint and torchrun need (NCCL/gloo settings come from the env ConfigMap)."""
    env = [
        # Restarts must not reuse the agent's rendezvous store (pytorch/pytorch#135712).
        {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"},
        {"name": "DTRAIN_WAIT_FOR_HOST", "value": spec.rdzv_host},
        *security.writable_env(),
    ]
    if spec.run_dir_url:  # the local working folder of a bucket-backed run: the pod's emptyDir
        env.append({"name": "DTRAIN_CACHE_DIR", "value": RUNS_DIR})
    cpus = _cpu_request(spec)
    if cpus.isdigit():  # else `dtrain launch` would split every core of the machine, not the request
        env.append({"name": "OMP_NUM_THREADS", "value": str(max(1, int(cpus) // spec.nproc_per_node))})
    return env


def labels(spec: JobSpec) -> dict:
    return {"app.kubernetes.io/name": "distributed-train", "app.kubernetes.io/instance": spec.name}


def metadata(spec: JobSpec, name: str) -> dict:
    """name, the namespace when given, and the labels every object carries."""
    meta: dict[str, Any] = {"name": name}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    meta["labels"] = labels(spec)
    return meta


def _cpu_request(spec: JobSpec) -> str:
    return spec.cpus_per_node or (str(spec.procs_per_node) if spec.cpu else str(8 * spec.gpus_per_node))


def resources(spec: JobSpec) -> dict:
    """Requests per node; memory (and GPUs) also as limits. No CPU limit: it throttles the whole job."""
    cpus = _cpu_request(spec)
    memory = spec.memory_per_node or (f"{2 * spec.procs_per_node}Gi" if spec.cpu
                                      else f"{32 * spec.gpus_per_node}Gi")
    result: dict[str, Any] = {"requests": {"cpu": cpus, "memory": memory}, "limits": {"memory": memory}}
    if not spec.cpu:
        result["requests"]["nvidia.com/gpu"] = spec.gpus_per_node
        result["limits"]["nvidia.com/gpu"] = spec.gpus_per_node
    rdma = spec.rdma_resource()
    if rdma:  # extended resources: request and limit must be equal
        result["requests"][rdma[0]] = result["limits"][rdma[0]] = rdma[1]
    return result


def volume_mounts() -> list[dict]:
    return [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "runs", "mountPath": RUNS_DIR}, *security.writable_mounts()]


def volumes(spec: JobSpec) -> list[dict]:
    runs = {"emptyDir": {}} if spec.run_dir_url else {"persistentVolumeClaim": {"claimName": spec.claim_name}}
    return [{"name": "config", "configMap": {"name": f"{spec.name}-config"}}, {"name": "runs", **runs},
            *security.writable_volumes()]


def env_from_secret(spec: JobSpec) -> list[dict]:
    """`--storage-secret NAME`: every key of the Secret as a variable (AWS_ACCESS_KEY_ID, ...)."""
    return [{"secretRef": {"name": spec.storage_secret}}] if spec.storage_secret else []


def pod_spec(spec: JobSpec, container_name: str = CONTAINER) -> dict:
    """The hardened pod every node runs: one container, config from a ConfigMap, run_dir on the claim."""
    container = {
        "name": container_name,
        "image": spec.image,
        "command": [ENTRYPOINT],
        "args": container_args(spec),
        "env": container_env(spec),
        "envFrom": [{"configMapRef": {"name": f"{spec.name}-env"}}, *env_from_secret(spec)],
        "ports": [{"name": "pytorchjob-port" if spec.kind == "pytorchjob" else "rdzv",
                   "containerPort": RDZV_PORT}],
        "resources": resources(spec),
        "securityContext": security.container_security_context(spec.rdma is not None),
        "volumeMounts": volume_mounts(),
    }
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": spec.grace_period_s,
        "automountServiceAccountToken": False,  # training never calls the Kubernetes API
        "securityContext": security.pod_security_context(),
        "containers": [container],
        "volumes": volumes(spec),
    }
    if spec.priority_class:
        pod["priorityClassName"] = spec.priority_class
    return pod


def env_config(spec: JobSpec) -> dict:
    """The `<name>-env` ConfigMap's data: network settings a user may edit per cluster."""
    env = {"GLOO_SOCKET_IFNAME": "eth0"}  # the pod network; gloo may otherwise pick an unroutable one
    if not spec.cpu:
        env["NCCL_DEBUG"] = "WARN"
        if spec.nccl_socket_ifname:  # otherwise NCCL's own choice (it skips lo and docker bridges)
            env["NCCL_SOCKET_IFNAME"] = spec.nccl_socket_ifname
    return env


def config_maps(spec: JobSpec, config_text: str) -> list[dict]:
    """`<name>-config` holds config.yaml; every key of `<name>-env` becomes an environment variable."""
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(spec, f"{spec.name}-config"),
         "data": {"config.yaml": config_text}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(spec, f"{spec.name}-env"),
         "data": env_config(spec)},
    ]


def run_claim(spec: JobSpec) -> dict:
    """The claim holding run_dir; every node mounts it, so it must be shared (ReadWriteMany)."""
    mode = spec.pvc_access_mode or ("ReadWriteOnce" if spec.cpu else "ReadWriteMany")
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(spec, spec.claim_name),
        "spec": {"accessModes": [mode], "resources": {"requests": {"storage": spec.pvc_size}}},
    }
    if spec.storage_class:
        claim["spec"]["storageClassName"] = spec.storage_class
    return claim


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
