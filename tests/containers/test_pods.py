"""The translation of a rendered pod into `podman run` options (tests/containers/pods.py), which the
container tests run: every kind of field the manifests set is translated, and a field it does not
know fails it, so the manifests cannot gain a setting that no container test runs. No podman needed."""

from __future__ import annotations

import copy

import pytest

from tests.containers import pods


def test_the_rendered_job_translates_to_the_hardened_run_the_tests_use(tmp_path):
    job, maps = pods.render(["--cpu", "--nodes", "2", "--image", "dtrain:test", "--checkpoint.every_steps=5"])
    options = pods.run_options(job, maps, {"dtrain-runs": tmp_path / "runs"}, tmp_path)
    assert {"--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--user=10001:10001",
            "--group-add=10001", "--env=HOME=/tmp", "--env=TMPDIR=/tmp", f"--volume={tmp_path / 'runs'}:/runs",
            f"--volume={tmp_path / 'config'}:/etc/dtrain:ro", "--tmpfs=/tmp:rw,exec,mode=1777",
            "--entrypoint=dtrain-entrypoint"} <= set(options)
    assert (tmp_path / "config" / "config.yaml").read_text() == maps["dtrain-config"]["config.yaml"]
    image = options.index("dtrain:test")
    assert options[image + 1:] == job["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("where, field", [("pod", "hostNetwork"), ("container", "lifecycle"),
                                          ("securityContext", "runAsUser=0"), ("volume", "hostPath")])
def test_a_field_the_tests_do_not_run_fails_the_translation(tmp_path, where, field):
    job, maps = pods.render(["--cpu", "--image", "dtrain:test", "--checkpoint.every_steps=5"])
    changed = copy.deepcopy(job)
    pod = changed["spec"]["template"]["spec"]
    if where == "pod":
        pod[field] = True
    elif where == "container":
        pod["containers"][0][field] = {"preStop": {"exec": {"command": ["true"]}}}
    elif where == "securityContext":
        pod["containers"][0]["securityContext"]["runAsUser"] = 0
    else:
        pod["volumes"][0] = {"name": pod["volumes"][0]["name"], "hostPath": {"path": "/"}}
    with pytest.raises(AssertionError, match="runAsNonRoot|not translated"):
        pods.run_options(changed, maps, {"dtrain-runs": tmp_path}, tmp_path)
