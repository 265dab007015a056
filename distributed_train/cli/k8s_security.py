"""The hardened pod every kind runs: no privileges, no capabilities, no API token, a read-only root.

Kubernetes' "restricted" Pod Security Standard plus what scanners such as checkov ask for. The
program still writes where it must: the run dir on the claim, /tmp (HOME, torch and wandb caches,
compile caches) and /dev/shm (DataLoader workers, NCCL), both `emptyDir`s.
"""

from __future__ import annotations

from typing import Any

# A high UID outside the range of host users (scanners flag < 10000), the same as the image's own
# user (docker/Dockerfile; a test checks they agree). Its files are world-readable anyway.
USER_ID = 10001
TMP_DIR = "/tmp"
# What the program writes outside run_dir goes under /tmp: ~/.cache, ~/.config/wandb, triton, inductor.
WRITABLE_ENV = {"HOME": TMP_DIR, "TMPDIR": TMP_DIR, "USER": "dtrain"}
RDMA_CAPABILITY = "IPC_LOCK"  # RDMA NICs pin memory; nothing else needs a capability


def pod_security_context() -> dict:
    """Run as a high non-root UID under the runtime's default seccomp profile; fsGroup opens the claim."""
    return {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context(rdma: bool = False) -> dict:
    """No privilege escalation, no capabilities (IPC_LOCK only with `--rdma`), read-only root."""
    capabilities: dict[str, Any] = {"drop": ["ALL"]}
    if rdma:
        capabilities["add"] = [RDMA_CAPABILITY]
    return {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
            "capabilities": capabilities, "seccompProfile": {"type": "RuntimeDefault"}}


def writable_volumes() -> list[dict]:
    """emptyDirs for the places a read-only root filesystem would otherwise break."""
    return [
        {"name": "tmp", "emptyDir": {}},
        # DataLoader workers and NCCL share memory through /dev/shm; the default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]


def writable_mounts() -> list[dict]:
    return [{"name": "tmp", "mountPath": TMP_DIR}, {"name": "dshm", "mountPath": "/dev/shm"}]


def writable_env() -> list[dict]:
    return [{"name": key, "value": value} for key, value in WRITABLE_ENV.items()]


def service_account(name: str, metadata: dict) -> dict:
    """A ServiceAccount without an API token, for kinds whose pod spec cannot switch the token off."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {**metadata, "name": name},
            "automountServiceAccountToken": False}


def network_policy(name: str, metadata: dict, pod_labels: dict) -> dict:
    """Only the job's own pods may connect to its pods (rendezvous, gloo/NCCL on ports torch picks)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {**metadata, "name": name},
            "spec": {"podSelector": {"matchLabels": pod_labels}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": pod_labels}}]}]}}


# Scanner (checkov) findings left on purpose: check id -> why. docs/kubernetes.md repeats this list.
DELIBERATE_EXCEPTIONS = {
    "CKV_K8S_11": "no CPU limit: CFS throttling slows every rank of a synchronous job to the slowest",
    "CKV_K8S_43": "image by tag, not digest: the user chooses (dtrain k8s refuses `latest`; a digest works too)",
    "CKV_K8S_15": "imagePullPolicy not Always: every restart would depend on the registry",
    # Flagged on bare Pods only (how the scan sees a TrainJob's or PyTorchJob's pod), not on Jobs.
    "CKV_K8S_8": "no liveness probe: a training process serves nothing; torchrun and the collective "
                 "timeout notice a hung rank",
    "CKV_K8S_9": "no readiness probe: nothing routes traffic to a training pod",
}
# Left only when --namespace is not given: the objects go to kubectl's current namespace.
WITHOUT_NAMESPACE = "CKV_K8S_21"
