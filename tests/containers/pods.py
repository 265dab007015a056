"""A pod that `dtrain k8s` renders, run with podman: the manifests' container, image, user, security
context, environment and volumes become `podman run` options, so the container tests run what the
manifests say.

Every field of the pod template and of its container is translated or named below as one that a
single machine cannot express; any other field fails the translation, so the manifests cannot
gain a setting the container tests do not run.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from distributed_train.cli import k8s

# Fields podman on one machine has no counterpart for: Kubernetes acts on them, the container does not.
NOT_RUN_HERE = {
    "automountServiceAccountToken",  # no API server here
    "restartPolicy",  # the Job controller's; the tests restart containers themselves
    "terminationGracePeriodSeconds",  # the tests' `podman stop --time`
    "subdomain",  # DNS of the headless Service: --add-host in node_options
    "resources",  # requests schedule; this machine enforces no cgroup limits
    "ports",  # host network: the rendezvous port is the host's
    "name",
}


def render(argv: list[str]) -> tuple[dict, dict[str, dict]]:
    """The Job `dtrain k8s ARGV` renders, and its ConfigMaps by name."""
    objects = list(yaml.safe_load_all(k8s.manifests(argv)))
    job = next(o for o in objects if o["kind"] == "Job")
    maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    return job, maps


def security_options(pod: dict) -> list[str]:
    """The pod's and its container's security context as podman options."""
    context = {**pod.get("securityContext", {}), **pod["containers"][0].get("securityContext", {})}
    options = []
    for key, value in context.items():
        if key in ("runAsUser", "runAsGroup", "runAsNonRoot"):
            continue
        elif key == "fsGroup":
            options.append(f"--group-add={value}")
        elif key == "readOnlyRootFilesystem" and value:
            options.append("--read-only")
        elif key == "allowPrivilegeEscalation" and not value:
            options.append("--security-opt=no-new-privileges")
        elif key == "privileged" and not value:
            continue
        elif key == "capabilities":
            options += [f"--cap-drop={c}" for c in value.get("drop", [])]
            options += [f"--cap-add={c}" for c in value.get("add", [])]
        elif key == "seccompProfile" and value == {"type": "RuntimeDefault"}:
            continue  # podman's default seccomp profile
        else:
            raise AssertionError(f"securityContext.{key}={value!r}: not translated to podman "
                                 "(tests/containers/pods.py)")
    user, group = context.get("runAsUser"), context.get("runAsGroup")
    if user is not None:
        assert not (context.get("runAsNonRoot") and user == 0), "runAsNonRoot with runAsUser 0"
        options.append(f"--user={user}:{group if group is not None else user}")
    return options


def run_options(job: dict, maps: dict[str, dict], claims: dict[str, Path], folder: Path) -> list[str]:
    """`podman run` options for one pod of `job` (without its host name): the container's command,
    environment, volumes and security; `claims` maps a claim name to the host folder it stands for;
    ConfigMap volumes are written under `folder`."""
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for key in set(pod) - NOT_RUN_HERE - {"securityContext", "containers", "volumes"}:
        raise AssertionError(f"pod spec field {key!r}: not translated to podman (tests/containers/pods.py)")
    for key in set(container) - NOT_RUN_HERE - {"image", "command", "args", "env", "envFrom",
                                                  "securityContext", "volumeMounts"}:
        raise AssertionError(f"container field {key!r}: not translated to podman (tests/containers/pods.py)")
    options = ["--network=host", *security_options(pod)]
    options += [f"--env={e['name']}={e['value']}" for e in container.get("env", [])]
    for source in container.get("envFrom", []):
        options += [f"--env={k}={v}" for k, v in maps[source["configMapRef"]["name"]].items()]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        options.append(_volume(volumes[mount["name"]], mount, maps, claims, folder))
    (entrypoint,) = container["command"]
    return [*options, f"--entrypoint={entrypoint}", container["image"], *container.get("args", [])]


def _volume(volume: dict, mount: dict, maps: dict[str, dict], claims: dict[str, Path], folder: Path) -> str:
    path, read_only = mount["mountPath"], ":ro" if mount.get("readOnly") else ""
    if "configMap" in volume:
        files = folder / volume["name"]
        files.mkdir(parents=True, exist_ok=True)
        for name, text in maps[volume["configMap"]["name"]].items():
            (files / name).write_text(text)
            (files / name).chmod(0o644)
        files.chmod(0o755)
        return f"--volume={files}:{path}{read_only}"
    if "persistentVolumeClaim" in volume:
        return f"--volume={claims[volume['persistentVolumeClaim']['claimName']]}:{path}{read_only}"
    if volume.get("emptyDir") == {"medium": "Memory"} and path == "/dev/shm":
        return "--shm-size=2g"  # a memory emptyDir on /dev/shm: podman's own /dev/shm, bigger
    if volume.get("emptyDir") == {}:
        return f"--tmpfs={path}:rw,exec,mode=1777"  # the kubelet's emptyDir: writable by any user
    raise AssertionError(f"volume {volume}: not translated to podman (tests/containers/pods.py)")
