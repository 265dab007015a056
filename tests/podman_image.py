"""The project's image, built for real with podman for the container tests (tests/containers/).
Never a mock: `podman build` of docker/Dockerfile, then `podman run` of what it built.

- Reuse: the image is tagged with a hash of everything its build reads (the Dockerfile, the
  entrypoint, the package, its metadata, the example configs, the build arguments and the base
  image); an image with that tag is used as it is, and older test images are removed.
- Base: PYTHON_IMAGE (python:3.11-slim-bookworm) when it is here or can be pulled; where no
  registry can be reached, a Debian bookworm base made with debootstrap and `podman import`.
- pip inside the build uses the host's pip settings (indexes, find-links, CA bundle), with the
  local folders they name mounted read-only; PyTorch's CPU index only when it can be reached.
- podman runs with a containers.conf of its own (CONTAINERS_CONF): runc, cgroupfs, and rlimits
  below this kind of machine's hard limits (../shared/RUNTIMES.md); nothing of the machine's
  own configuration is changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import torch

from tests.helpers import REPO, run_cmd, unavailable

PACKAGES = "podman debootstrap runc"
TEST_REPOSITORY = "localhost/distributed-train-test"
BASE = "docker.io/library/python:3.11-slim-bookworm"
LOCAL_BASE = "localhost/dtrain-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STATE = Path(tempfile.gettempdir()) / "dtrain-podman"
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def environ() -> dict:
    """The environment every podman command runs with."""
    STATE.mkdir(exist_ok=True)
    conf = STATE / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """One podman command; on failure (when `check`) an AssertionError with its whole output."""
    return run_cmd(["podman", *args], env=environ(), timeout=timeout, check=check)


def _missing() -> str | None:
    """Why podman cannot build and run images here, or None."""
    if not shutil.which("podman"):
        return f"podman is not installed: apt-get install {PACKAGES}"
    if os.geteuid() != 0:
        return "the container tests run rootful podman (root needed)"
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if info.returncode != 0:
        return f"podman cannot run here: {(info.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def _exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def base_image() -> str:
    """PYTHON_IMAGE if it is here or can be pulled, else the local debootstrap base (made once)."""
    for image in (BASE, LOCAL_BASE):
        if _exists(image):
            return image
    if podman("pull", "--quiet", BASE, check=False, timeout=120).returncode == 0:
        return BASE
    if not shutil.which("debootstrap"):
        unavailable(f"no registry reachable for {BASE} and debootstrap is missing: apt-get install {PACKAGES}")
    with tempfile.TemporaryDirectory(prefix="dtrain-base-") as folder:
        root = Path(folder) / "root"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(root),
                        _debian_mirror()], check=True, capture_output=True, timeout=900)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(root / cache, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "--change", 'CMD ["python3"]', "-", LOCAL_BASE], stdin=tar.stdout,
                       env=environ(), check=True, capture_output=True, timeout=600)
        tar.wait()
    return LOCAL_BASE


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb.debian.org otherwise)."""
    for sources in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.sources")]:
        with contextlib.suppress(OSError):
            for line in sources.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] or (words[:1] == ["deb"] and len(words) > 2):
                    uri = words[1] if words[0] == "URIs:" else words[-3]
                    if uri.rstrip("/").endswith("/debian"):
                        return uri
    return "http://deb.debian.org/debian"


def _pip_settings() -> tuple[str, list[str]]:
    """A pip.conf for the build steps from the host's pip settings, and the -v options it needs.
    A host `constraint` is left out: it pins the host's packages, not the image's."""
    listed = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in ("index-url", "extra-index-url", "find-links", "cert", "trusted-host", "timeout"):
            settings[name] = value.strip().strip("'\"")
    mounts = []
    for name in ("extra-index-url", "find-links", "cert", "index-url"):
        for value in settings.get(name, "").split():
            path = value.removeprefix("file://")
            if path.startswith("/") and Path(path).exists():
                mounts.append(f"{Path(path).parents[0] if path.endswith('/simple') else path}")
    conf = "[global]\n" + "".join(f"{name} = {value}\n" for name, value in settings.items())
    return conf, [f"--volume={path}:{path}:ro" for path in dict.fromkeys(mounts)]


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def _sources_hash(build_args: dict) -> str:
    digest = hashlib.sha256(json.dumps(build_args, sort_keys=True).encode())
    files = [*sorted(p for p in (REPO / "docker").rglob("*") if p.is_file()), REPO / ".dockerignore",
             REPO / "pyproject.toml", REPO / "README.md", *sorted((REPO / "examples").glob("*.yaml")),
             *sorted(p for p in (REPO / "distributed_train").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
        digest.update(oct(path.stat().st_mode & 0o111).encode())
    return digest.hexdigest()[:12]


def build(target: str = "cpu") -> str:
    """The image of `target`, built now or reused; its tag."""
    if reason := _missing():
        unavailable(reason)
    STATE.mkdir(exist_ok=True)
    with (STATE / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (pytest-xdist workers, parallel runs)
        base = base_image()
        base_id = podman("image", "inspect", "--format", "{{.Id}}", base).stdout.strip()
        build_args = {"PYTHON_IMAGE": base, "TORCH_VERSION": torch.__version__.split("+")[0],
                      "TORCH_CPU_INDEX": TORCH_CPU_INDEX if _reachable(TORCH_CPU_INDEX + "/") else ""}
        tag = f"{TEST_REPOSITORY}:{target}-{_sources_hash({**build_args, 'base': base_id, 'target': target})}"
        if not _exists(tag):
            started = int(time.time())
            pip_conf, mounts = _pip_settings()
            conf_file = STATE / "pip.conf"
            conf_file.write_text(pip_conf)
            podman("build", "--network=host", "--file", str(REPO / "docker" / "Dockerfile"), "--target", target,
                   *[f"--build-arg={k}={v}" for k, v in build_args.items()],
                   f"--volume={conf_file}:/etc/pip.conf:ro", *mounts, "--tag", tag, str(REPO), timeout=1800)
            # Each build leaves its build stage as an untagged image (~1 GB): those of earlier builds
            # go; this build's stays, as the cache of the next (its layers are parents: kept).
            podman("image", "prune", "--force", "--filter", f"until={started}", check=False)
        _remove_older(tag)
    return tag


def _remove_older(keep: str) -> None:
    """Earlier test images of this target (their layers stay cached while another image uses them)."""
    target = keep.rsplit(":", 1)[1].split("-")[0]
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", TEST_REPOSITORY).stdout.split()
    for image in listed:
        if image != keep and image.rsplit(":", 1)[1].startswith(f"{target}-"):
            podman("rmi", "--force", image, check=False)


def image_size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


@contextlib.contextmanager
def container(name: str) -> Iterator[str]:
    """A container name that is removed afterwards whatever happened."""
    podman("rm", "--force", "--ignore", name, check=False)
    try:
        yield name
    finally:
        podman("rm", "--force", "--ignore", "--time", "0", name, check=False, timeout=120)
