"""A real Slurm cluster for tests: one controller and N nodes on this host, from Debian's packages
(`.ci/run` installs them), torn down afterwards whatever happened. Never a mock of Slurm: jobs are
submitted with sbatch, scheduled by slurmctld and run by slurmd (../shared/RUNTIMES.md).

Each node is a `slurmd` of its own, in a UTS namespace with its own host name (n1, n2, ...) and
its own loopback address (127.0.11.K, added to /etc/hosts for the cluster's lifetime), so that
torchrun's c10d rendezvous and gloo see distinct hosts. munge runs privately with its own key
and socket in the cluster's folder; clients find the cluster through SLURM_CONF.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from tests.helpers import free_port, unavailable

PACKAGES = "slurmctld slurmd slurm-client munge"
HOSTS_MARK = "# dtrain-test-slurm"


def _missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged", "unshare") if not shutil.which(tool)]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing): apt-get install {PACKAGES}"
    if os.geteuid() != 0:
        return "a test Slurm cluster needs root (slurmd per node in its own UTS namespace)"
    return None


def _conf(folder: Path, nodes: int, ports: list[int], socket_path: Path) -> str:
    node_lines = "\n".join(f"NodeName=n{k} NodeAddr=127.0.11.{k} CPUs=2 Port={ports[k]} State=UNKNOWN"
                           for k in range(1, nodes + 1))
    return f"""ClusterName=dtrain-test
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ports[0]}
AuthType=auth/munge
AuthInfo=socket={socket_path}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
SlurmdParameters=config_overrides
{node_lines}
PartitionName=debug Nodes=n[1-{nodes}] Default=YES MaxTime=INFINITE State=UP
"""


def _edit_hosts(nodes: int, add: bool) -> None:
    hosts = Path("/etc/hosts")
    kept = [line for line in hosts.read_text().splitlines() if not line.endswith(HOSTS_MARK)]
    if add:
        kept += [f"127.0.11.{k} n{k} {HOSTS_MARK}" for k in range(1, nodes + 1)]
    hosts.write_text("\n".join(kept) + "\n")


@contextlib.contextmanager
def slurm_cluster(nodes: int = 2) -> Iterator[dict]:
    """Start the cluster; yield the environment its clients need (SLURM_CONF) and its folder."""
    if reason := _missing():
        unavailable(reason)
    folder = Path(tempfile.mkdtemp(prefix="dtrain-slurm-"))
    procs: list[subprocess.Popen] = []
    try:
        (folder / "munge").mkdir(mode=0o755)
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_socket = folder / "munge" / "munge.socket"
        procs.append(subprocess.Popen(
            ["munged", "-F", f"--key-file={key}", f"--socket={munge_socket}", f"--pid-file={folder}/munged.pid",
             f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed", "--force"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        conf = folder / "slurm.conf"
        conf.write_text(_conf(folder, nodes, [free_port() for _ in range(nodes + 1)], munge_socket))
        (folder / "state").mkdir()
        _edit_hosts(nodes, add=True)
        env = {**os.environ, "SLURM_CONF": str(conf)}
        _wait(lambda: munge_socket.exists(), 30, "munged did not start", folder)
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for k in range(1, nodes + 1):
            (folder / "spool" / f"n{k}").mkdir(parents=True)
            procs.append(subprocess.Popen(["unshare", "--uts", "sh", "-c",
                                           f"hostname n{k} && exec slurmd -D -N n{k} -f {conf}"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: _idle_nodes(env) == nodes, 60, f"the {nodes} nodes did not become idle", folder)
        yield {"SLURM_CONF": str(conf), "folder": str(folder)}
    finally:
        if procs:
            subprocess.run(["scancel", "--full", "--quiet", "--user", "root"],
                           env={**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _edit_hosts(nodes, add=False)
        shutil.rmtree(folder, ignore_errors=True)


def _idle_nodes(env: dict) -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    return sum(state.strip() == "idle" for state in out.stdout.splitlines())


def _wait(condition, timeout: float, what: str, folder: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(folder.glob("*.log")))
            raise RuntimeError(f"{what} within {timeout:.0f} s\n{logs}")
        time.sleep(0.2)


def job_state(env: dict, job_id: str) -> tuple[str, int]:
    """(state, restart count) of a job from scontrol ("" when Slurm no longer knows it)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30)
    fields = dict(part.split("=", 1) for part in out.stdout.split() if "=" in part)
    return fields.get("JobState", ""), int(fields.get("Restarts", "0") or 0)
