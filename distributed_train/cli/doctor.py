"""`dtrain doctor`: preflight of this machine or of a job, before training starts.

Outside torchrun it starts itself under torch.distributed.run with N local ranks (as `dtrain
launch` does); under torchrun (a Kubernetes init step: `torchrun ... -m distributed_train doctor`)
every rank runs the checks: the environment, an all-reduce bandwidth sweep reported like
nccl-tests (algbw = bytes / time; busbw = algbw * 2(n-1)/n, what the links carry), a matmul
throughput per device, and a verdict line. Exit 0 when healthy, 1 with the reasons otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import statistics
import sys
import time

from distributed_train.cli import described
from distributed_train.errors import UsageError

SLOW_FACTOR = 0.5  # a device below half the median matmul speed is a bad node
MIN_SHM_GIB = 1.0  # NCCL moves data through /dev/shm; Docker's default of 64 MiB breaks it


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dtrain doctor", description=described(__doc__))
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="local ranks to start when not under torchrun (default: GPUs, else 2)")
    parser.add_argument("--max-mib", type=float, default=None,
                        help="largest all-reduce in MiB (default: 256 with CUDA, 16 on CPU)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="collective timeout")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UsageError(f"dtrain doctor: unknown argument {unknown[0]!r}; see dtrain doctor --help")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UsageError("--nproc-per-node must be >= 1")
    return args


def main(argv: list[str]) -> int:
    """Run under torchrun's ranks (starting them first when needed) and print the report."""
    args = _parse(argv)
    if "RANK" not in os.environ:
        return _launch(args)
    return _check_rank(args)


def _launch(args: argparse.Namespace) -> int:
    """Start N local ranks through torch.distributed.run, each running `dtrain doctor`."""
    from distributed_train.cli.launch import (
        RESTART_SAFE_ENV,
        build_torchrun_args,
        default_nproc,
        run_torchrun,
        torchrun_parser,
    )
    from distributed_train.distributed import cpu_count

    nproc = args.nproc_per_node or default_nproc()
    ours = ["--timeout-s", str(args.timeout_s)] + (["--max-mib", str(args.max_mib)] if args.max_mib else [])
    torchrun_args = build_torchrun_args(["--nproc-per-node", str(nproc)], [])
    assert torchrun_args[-1] == "train", torchrun_args
    torchrun_args[-1:] = ["doctor", *ours]
    for key, value in RESTART_SAFE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))
    return run_torchrun(torchrun_parser().parse_args(torchrun_args))


def environment() -> dict:
    """What this rank sees: versions, devices, backends, torchrun variables, shared memory."""
    import torch
    import torch.distributed as torch_dist
    cuda = torch.cuda.is_available()
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else None
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda and torch_dist.is_nccl_available() else None,
        "gloo": torch_dist.is_gloo_available(),
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torchrun": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                     "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")},
        "shm_gib": shm, "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allreduce_sweep(device, world_size: int, max_mib: float, average=None) -> list[dict]:
    """algbw/busbw in GB/s for float32 all-reduces from 4 KiB to `max_mib` (slowest rank's time).

    `average(tensor)`, when given, is an in-place mean across ranks measured instead of the
    backend's sum (the shared-memory all-reduce)."""
    import torch
    import torch.distributed as torch_dist
    reduce = average or torch_dist.all_reduce
    expected = (world_size + 1) / 2 if average else world_size * (world_size + 1) / 2
    rows, size, rank = [], 4096, torch_dist.get_rank()
    while size <= max_mib * 2**20:
        tensor = torch.full((size // 4,), rank + 1.0, dtype=torch.float32, device=device)
        reduce(tensor)  # also warms up the connections and buffers
        correct = bool((tensor == expected).all())
        tensor.zero_()
        iters = max(3, min(50, int(2**24 // size)))
        reduce(tensor)
        _sync(device)
        torch_dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            reduce(tensor)
        _sync(device)
        elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
        torch_dist.all_reduce(elapsed, op=torch_dist.ReduceOp.MAX)
        seconds = elapsed.item()
        algbw = size / seconds / 1e9
        rows.append({"bytes": size, "time_us": seconds * 1e6, "algbw": algbw,
                     "busbw": algbw * 2 * (world_size - 1) / world_size, "correct": correct})
        size *= 4
    return rows


def shm_allreduce_sweep(env, device, max_mib: float, timeout_s: float) -> list[dict]:
    """The same sweep through the shared-memory all-reduce, where training would use it (else [])."""
    from distributed_train.distributed import shm_allreduce

    reducer = shm_allreduce.setup(env, device, "auto", int(max_mib * 2**20), timeout_s)
    return allreduce_sweep(device, env.world_size, max_mib, average=reducer.all_reduce_mean_) if reducer else []


MATMUL_ROUNDS, ROUND_S = 5, 0.1


def matmul_tflops(device) -> float:
    """Dense matmul throughput of this device in TFLOP/s (bf16 on GPU, fp32 on CPU): the best of
    5 rounds of 0.1 s, so a rank whose cores something else took for a moment is not named slow
    (a slow device is slow in every round)."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, thread pool)
    _sync(device)
    rounds = []
    for _ in range(MATMUL_ROUNDS):
        iters, start = 0, time.perf_counter()
        while time.perf_counter() - start < ROUND_S or iters < 1:
            a @ b
            _sync(device)
            iters += 1
        rounds.append(2 * n**3 * iters / (time.perf_counter() - start) / 1e12)
    return max(rounds)


def verdict(envs: list[dict], sweep: list[dict], tflops: list[float]) -> list[str]:
    """The problems found (empty when healthy)."""
    problems = [f"all-reduce of {row['bytes']} bytes gave a wrong sum" for row in sweep if not row["correct"]]
    median = statistics.median(tflops)
    problems += [f"rank {r} matmul {t:.3g} TFLOP/s is under {SLOW_FACTOR:g}x the median {median:.3g}"
                 for r, t in enumerate(tflops) if t < SLOW_FACTOR * median]
    # NCCL's shared-memory transport joins the GPUs of one node: a node with one rank does not use it.
    problems += [f"rank {r} ({e['host']}) has only {e['shm_gib']:.2g} GiB of /dev/shm (NCCL needs more between "
                 "the node's GPUs; give the container --shm-size=1g or an emptyDir medium: Memory)"
                 for r, e in enumerate(envs) if e["gpus"] and e["shm_gib"] is not None and e["shm_gib"] < MIN_SHM_GIB
                 and _local_ranks(e) > 1]
    return problems


def _local_ranks(env: dict) -> int:
    """The ranks on this rank's node (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    try:
        return int((env.get("torchrun") or {}).get("LOCAL_WORLD_SIZE") or 1)
    except ValueError:
        return 1


def _check_rank(args: argparse.Namespace) -> int:
    """Every rank: environment, process group, bandwidth sweep, matmul; rank 0 prints."""
    from distributed_train import distributed
    from distributed_train.distributed import diagnose
    from distributed_train.distributed.diagnose import communication_failures_explained

    diagnose.TIMEOUT_SETTING = "--timeout-s"  # what messages tell the user to raise
    env = distributed.read_env()
    backend = distributed.pick_backend("auto")
    device = distributed.pick_device(backend, env)
    distributed.init(env, backend, device, args.timeout_s)
    failed = True
    try:
        with communication_failures_explained(env.rank, env.world_size, args.timeout_s):
            envs = distributed.all_gather_object(environment())
            max_mib = args.max_mib or (256 if device.type == "cuda" else 16)
            sweep = allreduce_sweep(device, env.world_size, max_mib) if distributed.active() else []
            shm_sweep = shm_allreduce_sweep(env, device, max_mib, args.timeout_s) if distributed.active() else []
            tflops = distributed.all_gather_object(matmul_tflops(device))
        failed = False
    finally:
        distributed.teardown(failed)
    if env.is_main:
        report(envs, sweep, tflops, backend, shm_sweep)
    return 1 if verdict(envs, sweep + shm_sweep, tflops) else 0


def _print_sweep(rows: list[dict], title: str) -> None:
    if not rows:
        return
    print(f"{title}:")
    print(f"{'size (bytes)':>16} {'time (us)':>11} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}")
    for row in rows:
        print(f"{row['bytes']:>16} {row['time_us']:>11.1f} {row['algbw']:>13.3f} {row['busbw']:>13.3f}"
              f"{'' if row['correct'] else '  WRONG SUM'}")


def report(envs: list[dict], sweep: list[dict], tflops: list[float], backend: str,
           shm_sweep: list[dict] | None = None) -> None:
    """Print the environment, the bandwidth tables and the verdict (rank 0)."""
    first = envs[0]
    print(f"torch {first['torch']}, CUDA {first['cuda'] or 'none'}, NCCL {first['nccl'] or 'none'}, "
          f"gloo {'yes' if first['gloo'] else 'no'}; backend {backend}; {len(envs)} rank(s); "
          f"at {datetime.datetime.now().isoformat(timespec='seconds')}")
    for rank, (e, t) in enumerate(zip(envs, tflops)):
        device = e["gpus"][int(e["torchrun"]["LOCAL_RANK"] or 0)] if e["gpus"] else f"cpu ({e['threads']} threads)"
        shm = f"{e['shm_gib']:.1f} GiB" if e["shm_gib"] is not None else "none"
        print(f"rank {rank}: {e['host']} pid {e['pid']} {device}, visible {e['visible_devices'] or 'all'}, "
              f"/dev/shm {shm}, LOCAL_RANK {e['torchrun']['LOCAL_RANK']}/{e['torchrun']['LOCAL_WORLD_SIZE']}, "
              f"MASTER {e['torchrun']['MASTER_ADDR']}:{e['torchrun']['MASTER_PORT']}, matmul {t:.3g} TFLOP/s")
    _print_sweep(sweep, f"{backend} all_reduce")
    _print_sweep(shm_sweep or [], "shared-memory all-reduce (dtrain's gradient path for CPU ranks on one host)")
    problems = verdict(envs, sweep + (shm_sweep or []), tflops)
    peak = max((row["busbw"] for row in sweep), default=None)
    summary = f"peak busbw {peak:.3g} GB/s, " if peak is not None else ""
    if shm_sweep:
        summary += f"shared memory {max(row['busbw'] for row in shm_sweep):.3g} GB/s, "
    summary += f"matmul {min(tflops):.3g}-{max(tflops):.3g} TFLOP/s"
    if problems:
        print(f"verdict: UNHEALTHY ({summary}): {'; '.join(problems)}", flush=True)
    else:
        print(f"verdict: healthy ({len(envs)} rank(s), {summary})", flush=True)
    sys.stdout.flush()
