"""Checks that start a subprocess or an external tool: the import footprint of training, the
command line's one-line errors, and the security scan of the rendered Kubernetes manifests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distributed_train.cli import k8s, k8s_security
from tests.helpers import REPO, clean_env, dtrain
from tests.unit.test_k8s import (
    IMAGE,
    KINDS,
    by_kind,
    effective_pods,
    render,
    variant_args,
)

pytestmark = pytest.mark.slow


def test_training_without_wandb_imports_neither_wandb_nor_matplotlib(tmp_path):
    code = (
        "import sys, distributed_train\n"
        "assert not {'wandb', 'matplotlib', 'torch'} & set(sys.modules), 'import distributed_train'\n"
        "from distributed_train.cli import main\n"
        f"assert main(['train', '--log.wandb=disabled', '--train.max_steps=2', '--run_dir={tmp_path}']) == 0\n"
        "print(sorted(m for m in ('wandb', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["kind"] == "start"


def test_command_line_reports_bad_name_in_one_line():
    proc = dtrain("k8s", "--image", IMAGE, "--name", "Bad.Name", check=False, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--name" in proc.stderr


def test_ruff_checks_every_python_file_and_finds_nothing():
    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache"]
    listed = subprocess.run([*ruff, "--show-files", "."], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    checked = {Path(line.strip()).resolve() for line in listed.stdout.splitlines() if line.strip().endswith(".py")}
    ours = {REPO / "conftest.py", *(p for folder in ("distributed_train", "tests", "benchmarks", "launcher", "examples")
                                    for p in (REPO / folder).rglob("*.py"))}
    assert sorted(str(p.relative_to(REPO)) for p in ours - checked) == [], "files ruff does not check"
    found = subprocess.run([*ruff, "."], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stdout + found.stderr


def checkov_executable() -> str | None:
    """checkov from PATH, or DTRAIN_CHECKOV (it pins old dependencies: keep it in its own venv)."""
    return os.environ.get("DTRAIN_CHECKOV") or shutil.which("checkov")


def test_security_scan_finds_only_the_documented_exceptions(tmp_path):
    checkov = checkov_executable()
    if checkov is None:
        pytest.skip("checkov not installed (pipx install checkov, or DTRAIN_CHECKOV=/path/to/checkov)")
    for kind, cpu, nodes in [(k, cpu, n) for k in KINDS for cpu in (False, True) for n in ("1", "2:3")]:
        if kind == "trainjob" and ":" in nodes:
            continue
        objects = render(*variant_args(kind, cpu, 1), "--nodes", nodes, "--namespace", "ml")
        # checkov reads pods inside built-in kinds only: scan each kind's effective pod as a Pod too.
        labels = by_kind(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
        pods = [{"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": f"{kind}-pod", "namespace": "ml", "labels": labels},
                 "spec": pod} for pod in effective_pods(objects)]
        name = f"{kind}-{'cpu' if cpu else 'gpu'}-{nodes.replace(':', 'to')}.yaml"
        (tmp_path / name).write_text(yaml.safe_dump_all(objects + pods))
    (tmp_path / "no-namespace.yaml").write_text(k8s.manifests(["--image", IMAGE]))
    proc = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact",
                           "--skip-download", "-o", "json"], capture_output=True, text=True, timeout=180)
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = {(c["check_id"], Path(c["file_path"]).name) for c in report["results"]["failed_checks"]}
    allowed = set(k8s_security.DELIBERATE_EXCEPTIONS)
    unexpected = sorted((check, file) for check, file in failed if check not in allowed
                        and not (check == k8s_security.WITHOUT_NAMESPACE and file == "no-namespace.yaml"))
    assert unexpected == [], unexpected
    assert report["summary"]["passed"] > 100  # the scan looked at the pods
    assert (k8s_security.WITHOUT_NAMESPACE, "no-namespace.yaml") in failed
