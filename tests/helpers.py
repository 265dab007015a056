"""Shared test helpers: real gloo ranks in subprocesses, and `dtrain` / `torchrun` as commands.

Starting a rank is the slow part: `import torch`, and the `torch._dynamo` that the first optimizer
imports, cost ~3.5 s of CPU in a fresh interpreter. Ranks are therefore forked from a forkserver
that imported them once (a fork of a single-threaded process, as DataLoader workers are), and
several checks share one spawn.
"""

from __future__ import annotations

import collections
import io
import os
import queue as queue_module
import random
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "tasks"  # test task files, loaded by path (`--task=TASKS/toy.py:Regression`)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


# Results compared across configurations (world sizes, engines, micro-batching, launchers) come from
# jobs trained in float64: their rounding stays near 1e-15 whatever SIMD kernels the processor
# gets, so EXACT sits orders of magnitude above it and below what a real defect gives
# (tests/README.md; measured by tests/margin.py). Same-configuration claims stay bit-identical.
FP64 = "--train.precision=fp64"
EXACT = 1e-9


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost, below the kernel's ephemeral range.

    A port from `bind(0)` comes from that range, which every outgoing connection and every gloo
    listener of the other tests running meanwhile draws from too: between the pick and the rank-0
    store's listen, one of them took it (EADDRINUSE, seen in CI). Below the range only another
    pick can take it: each pytest-xdist worker draws from its own band, at random."""
    low = _ephemeral_low()
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % 8
    band = 1024 if low > 9216 else 0  # 8 bands right below the range
    for _ in range(100 if band else 0):
        port = low - 8 * band + worker * band + _RANDOM.randrange(band)
        if port in _HANDED:  # picked by another thread of this process a moment ago
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED.append(port)
            return port
    with socket.socket() as s:  # a kernel whose ephemeral range starts low: the old way
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RANDOM = random.SystemRandom()  # no state that forked ranks or a test's random.seed would share
_HANDED: collections.deque = collections.deque(maxlen=64)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


# Imported once by the forkserver, so that each rank starts with them loaded. Nothing here may start
# a thread, open a process group or read a setting a test changes later (see `_rank_main`).
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "distributed_train.training.run", "tests.helpers"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (first use)
    return ctx


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, args: tuple, queue: Any,
               environ: dict) -> None:
    # The forkserver's environment is the one of the moment it started: take the caller's now.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # OpenMP read its variables when the forkserver imported torch
    try:
        # Bytes, not tensors: torch's queue would share tensor storage through a file descriptor
        # that dies with this process.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as torch_dist

        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` new processes with torchrun's variables set.

    `fn` must be a module-level function (it is pickled). Returns the results in rank order;
    raises AssertionError with every failing rank's traceback.
    """
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, queue, environ))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, value = queue.get(timeout=0.5)
            except queue_module.Empty:
                # A rank that died without reporting (a crash in C++) leaves the others waiting.
                dead = [f"rank {r} exited with {p.exitcode} without a result" for r, p in enumerate(procs)
                        if p.exitcode is not None and r not in results]
                if dead or time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in results]
                    errors.append("; ".join(dead) or f"ranks {missing} gave no result in {timeout} s")
                continue
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{value}")  # the others may now wait forever
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def run_jobs(world_size: int, jobs: list[tuple[str, list[str]]], timeout: float = 240) -> dict[str, dict]:
    """Run each (name, overrides) training job in turn on the same `world_size` spawned ranks
    (one start per rank for all of them): {name: rank 0's train_in_rank result}.

    Each job gets its own rendezvous port, picked when it starts (`fresh_port`)."""
    with tempfile.TemporaryDirectory(prefix="dtrain-ports-") as ports:
        return run_ranks(jobs_in_rank, world_size, jobs, ports, timeout=timeout)[0]


def jobs_in_rank(rank: int, world_size: int, jobs: list, ports: str) -> dict | None:
    """Rank side of `run_jobs` (each job on a port picked through the folder `ports`); rank 0
    returns the results."""
    out = {}
    for name, overrides in jobs:
        os.environ["MASTER_PORT"] = str(fresh_port(rank, Path(ports), name))
        out[name] = train_in_rank(rank, world_size, overrides)
    return out if rank == 0 else None


def fresh_port(rank: int, directory: Path, job: str) -> int:
    """A port for job `job`'s process group, picked by rank 0 right before it and passed to the
    other ranks through a file in `directory`. A port picked long before may be taken by then
    (another test's ranks connect from ephemeral ports too), and reusing one lets a rank that
    finished the last job first join its old store again."""
    path = Path(directory) / f"port-{job}"
    if rank == 0:
        path.with_suffix(".tmp").write_text(str(free_port()))
        path.with_suffix(".tmp").replace(path)
    while not path.is_file():
        time.sleep(0.01)
    return int(path.read_text())


def unavailable(reason: str) -> None:
    """A real runtime (Slurm, podman) cannot run here: skip, or fail where CI requires every tier
    (`.ci/run` sets DTRAIN_REQUIRE_RUNTIMES=1), so a tier never passes by skipping in CI."""
    import pytest

    if os.environ.get("DTRAIN_REQUIRE_RUNTIMES") == "1":
        pytest.fail(f"required by DTRAIN_REQUIRE_RUNTIMES=1, but {reason}")
    pytest.skip(reason)


def clean_env(**extra: str) -> dict:
    """The current environment without torchrun variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.setdefault("WANDB_MODE", "disabled")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def temp_leftovers(tmpdir: Path) -> list[str]:
    """What launched processes left in the TMPDIR they were given: torchrun's and the launcher's
    folders for the workers' error files, wandb's temporary folders, multiprocessing's (the ranks'
    forkserver sockets)."""
    return sorted(p.name for p in Path(tmpdir).iterdir()
                  if p.name.startswith(("torchelastic_", "dtrain-launch-", "pymp-")) or "wandb" in p.name)


def run_cmd(args: list[str], cwd: Path | str | None = None, timeout: float = 240,
            env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; on failure (or timeout) the assertion shows its full stdout and stderr."""
    try:
        proc = subprocess.run(args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(args)} timed out after {timeout}s\n"
                             f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def dtrain(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """`python -m distributed_train ARGS` (same as the `dtrain` console script)."""
    return run_cmd([sys.executable, "-m", "distributed_train", *args], **kwargs)


def accelerate_launch(*args: str, tmp: Path, env: dict, **kwargs: Any) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu` with 2 CPU processes on a free port (never Accelerate's
    default 29500), TMPDIR `tmp`: the torchrun inside leaves a torchelastic_* folder there."""
    return run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), *args], env={**env, "TMPDIR": str(tmp)}, **kwargs)


def torchrun(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run ARGS` with restart-safe stores (see PITFALLS.md); its
    workers' error files go to a folder removed afterwards (by default torchrun leaves a
    torchelastic_* folder in TMPDIR per run)."""
    kwargs.setdefault("env", clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    with tempfile.TemporaryDirectory(prefix="dtrain-test-torchrun-") as logs:
        return run_cmd([sys.executable, "-m", "torch.distributed.run", f"--log-dir={logs}", *args], **kwargs)


def train_in_rank(rank: int, world_size: int, overrides: list[str]) -> dict:
    """Run a whole training job as this rank; returns the summary and the final parameters."""
    from distributed_train import distributed
    from distributed_train.cli.train import resolve_config
    from distributed_train.training.run import run_training

    config = resolve_config(None, ["--log.wandb=disabled", *overrides])
    summary = run_training(config, distributed.read_env())
    import torch

    state = torch.load(summary["final_model"], weights_only=True) if rank == 0 else None
    return {"summary": summary, "state": state}
