"""The workload objects, one function per kind, and `render()`: everything `dtrain k8s` prints.

- job: batch/v1 Indexed Job + headless Service, plain Kubernetes (the default);
- trainjob: Kubeflow Trainer v2 TrainJob over a ClusterTrainingRuntime (torch-distributed);
- pytorchjob: the Kubeflow training operator's legacy PyTorchJob (kubeflow.org/v1).
Every kind gets the same hardened pod (k8s_security.py) and the Kueue queue label when asked.
"""

from __future__ import annotations

from typing import Any

from distributed_train.cli import k8s_security as security
from distributed_train.cli.k8s_render import (
    CONTAINER,
    ENTRYPOINT,
    RDZV_PORT,
    TRAINJOB_NODE,
    JobSpec,
    config_maps,
    container_args,
    container_env,
    env_config,
    env_from_secret,
    labels,
    metadata,
    pod_spec,
    resources,
    run_claim,
    volume_mounts,
    volumes,
)

_EXIT_BAD_CONFIG = 2  # errors.EXIT_USAGE: retrying cannot fix it
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# A Kueue WorkloadPriorityClass: the TrainJob's pod spec has no priorityClassName to patch.
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
PATCH_MANAGER = "dtrain"


def workload_metadata(spec: JobSpec) -> dict:
    """The workload's metadata: Kueue admits it from the queue named in its labels."""
    meta = metadata(spec, spec.name)
    if spec.queue:
        meta["labels"][QUEUE_LABEL] = spec.queue
    if spec.priority_class and spec.kind == "trainjob":
        meta["labels"][PRIORITY_LABEL] = spec.priority_class
    return meta


def indexed_job(spec: JobSpec) -> dict:
    """batch/v1 Indexed Job: one pod per node, hostnames `<name>-<index>` under the Service."""
    pod = pod_spec(spec)
    pod.update(restartPolicy="Never", subdomain=spec.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": workload_metadata(spec),
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
            "template": {"metadata": {"labels": labels(spec)}, "spec": pod},
        },
    }


def headless_service(spec: JobSpec) -> dict:
    """Gives pod `<name>-<i>` the DNS name `<name>-<i>.<name>`, before it is ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(spec, spec.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels(spec),
            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}],
        },
    }


def pytorch_job(spec: JobSpec) -> dict:
    """Kubeflow PyTorchJob (kubeflow.org/v1): the operator makes `<name>-worker-<i>` pods and Services."""
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": workload_metadata(spec),
        "spec": {
            "elasticPolicy": {"rdzvBackend": "c10d", "rdzvPort": RDZV_PORT, "rdzvId": spec.name,
                              "minReplicas": spec.min_nodes, "maxReplicas": spec.nodes,
                              "maxRestarts": spec.max_restarts},
            "nprocPerNode": str(spec.nproc_per_node),
            "runPolicy": {"backoffLimit": spec.backoff_limit, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {"Worker": {
                "replicas": spec.nodes,
                # Not ExitCode: it would make exit 4 (a peer node was lost) permanent. A bad config
                # (exit 2) fails before any worker starts, so its retries up to backoffLimit are cheap.
                "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": labels(spec)}, "spec": pod_spec(spec, "pytorch")},
            }},
        },
    }


def train_job(spec: JobSpec) -> dict:
    """Kubeflow Trainer v2 TrainJob: the runtime's JobSet makes pods `<name>-node-0-<i>`.

    The trainer section carries what the TrainJob API has fields for (image, command, counts,
    resources); the pod hardening, volumes and grace period go in as a runtime patch."""
    env_from_config_map = [{"name": key, "valueFrom": {"configMapKeyRef": {"name": f"{spec.name}-env",
                                                                           "key": key}}}
                           for key in env_config(spec)]
    pod: dict[str, Any] = {
        "serviceAccountName": spec.name,  # its token is not mounted (the pod spec patch cannot say so)
        "securityContext": security.pod_security_context(),
        "terminationGracePeriodSeconds": spec.grace_period_s,
        "volumes": volumes(spec),
        "containers": [{"name": TRAINJOB_NODE,
                        "securityContext": security.container_security_context(spec.rdma is not None),
                        "volumeMounts": volume_mounts(), **({"envFrom": env_from_secret(spec)}
                                                           if spec.storage_secret else {})}],
    }
    node_patch = {"name": TRAINJOB_NODE, "template": {"spec": {"template": {
        "metadata": {"labels": labels(spec)}, "spec": pod}}}}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": workload_metadata(spec),
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                           "name": spec.runtime},
            "trainer": {
                "image": spec.image,
                "command": [ENTRYPOINT],
                "args": container_args(spec),
                "env": container_env(spec) + env_from_config_map,
                "numNodes": spec.nodes,
                "numProcPerNode": spec.nproc_per_node,
                "resourcesPerNode": resources(spec),
            },
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [node_patch]}}}}],
        },
    }


def render(spec: JobSpec, config_text: str) -> list[dict]:
    """Every object to apply, in the order `kubectl apply -f` should create them."""
    objects = config_maps(spec, config_text)
    if spec.pvc is None and not spec.run_dir_url:
        objects.append(run_claim(spec))
    objects.append(security.network_policy(spec.name, metadata(spec, spec.name), labels(spec)))
    if spec.kind == "pytorchjob":
        return objects + [pytorch_job(spec)]
    if spec.kind == "trainjob":
        return [security.service_account(spec.name, metadata(spec, spec.name))] + objects + [train_job(spec)]
    return objects + [headless_service(spec), indexed_job(spec)]
