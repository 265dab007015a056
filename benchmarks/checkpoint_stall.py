"""Checkpoint stall and save time: dtrain's sharded writer against a plain `dcp.async_save` loop on
the same state (a 50M-parameter MLP with AdamW: ~600 MB of model and optimizer state), 2 ranks on
gloo, under ddp (every rank holds the whole state) and fsdp (FSDP2 shards).

- stall: how long the training thread is held (staging; the slower rank, since the next
  collective waits for it). dtrain: `ShardedWriter.submit` (each rank stages only what it writes,
  into reused host buffers). Plain: the `dcp.async_save` call (every rank stages its whole state,
  into fresh buffers, as the DCP tutorial writes it).
- total: from the start of the save until it is durable and the previous checkpoint deleted:
  dtrain's is committed (fsynced, with the sha256 of every file in its commit record, computed
  while writing) and rotated (keep_last=1); plain's `future.result()` returned (fsynced by DCP, no
  checksums, no commit record) and rank 0 deleted the previous save's folder.

The two alternate, save after save, each after a warm-up save (its first save allocates its host
buffers; that save is reported apart). Medians over the repeats.

    python benchmarks/checkpoint_stall.py               # ~1 min on 2 cores
    python benchmarks/checkpoint_stall.py --params 2e6  # small and quick (the suite's check)

Prints a Markdown table, then one line per goal (stall <= plain's; total <= 2x plain's);
exit 0 when both hold for both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(params: float, engine: str):
    """The model (square Linear layers, ~`params` parameters) and AdamW with its state, wrapped
    for `engine`; the same on every rank (seeded)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    width = 2048 if params >= 20e6 else 512
    layers = max(1, round(params / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()  # creates exp_avg and exp_avg_sq: the state is 3x the parameters
    return model, optimizer


def slowest(seconds: float) -> float:
    """The largest of every rank's `seconds`."""
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, seconds)
    return max(every)


def worker(args) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from distributed_train.training.checkpoints import commit, shards

    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for engine in ("ddp", "fsdp"):
        model, optimizer = build(args.params, engine)
        state_bytes = 3 * sum(t.numel() * t.element_size() for t in model.parameters())  # DTensor: global numel
        ours_dir, plain_dir = Path(args.out) / engine / "dtrain", Path(args.out) / engine / "plain"
        writer = shards.ShardedWriter(ours_dir, rank == 0, lambda step, d=ours_dir: commit.rotate(d, 1, step))
        handle = SimpleNamespace(raw_model=model, optimizer=optimizer)
        timings = {"dtrain": [], "plain": []}
        for save in range(args.repeats + 1):
            step = save + 1
            dist.barrier()
            start = time.perf_counter()
            writer.submit(step, handle, {"step": step} if rank == 0 else None)
            stall = time.perf_counter() - start
            writer.wait()
            timings["dtrain"].append((slowest(stall), slowest(time.perf_counter() - start)))

            dist.barrier()
            start = time.perf_counter()
            state = shards.model_and_optimizer(handle)
            future = dcp.async_save(state, checkpoint_id=str(plain_dir / f"step-{step}"))
            stall = time.perf_counter() - start
            future.result()
            if rank == 0:  # as dtrain's rotation (keep_last=1) deletes the previous checkpoint
                shutil.rmtree(plain_dir / f"step-{step - 1}", ignore_errors=True)
            timings["plain"].append((slowest(stall), slowest(time.perf_counter() - start)))
        results[engine] = {"state_mb": state_bytes / 1e6, **timings}
        del model, optimizer, writer, handle
    if rank == 0:
        Path(args.out, "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def report(results: dict) -> bool:
    print("| engine | state | | stall first | stall (median) | total first | total (median) |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    goals = []
    for engine, found in results.items():
        medians = {}
        for name in ("dtrain", "plain"):
            saves = found[name]
            first, rest = saves[0], saves[1:]
            medians[name] = (statistics.median(s for s, _ in rest), statistics.median(t for _, t in rest))
            print(f"| {engine} | {found['state_mb']:.0f} MB | {name} | {first[0]:.3f} s | {medians[name][0]:.3f} s "
                  f"| {first[1]:.2f} s | {medians[name][1]:.2f} s |")
        stall_ratio = medians["dtrain"][0] / medians["plain"][0]
        total_ratio = medians["dtrain"][1] / medians["plain"][1]
        goals.append((f"{engine}: stall {stall_ratio:.2f}x plain's (goal <= 1)", stall_ratio <= 1.0))
        goals.append((f"{engine}: total {total_ratio:.2f}x plain's (goal <= 2)", total_ratio <= 2.0))
    print()
    for text, met in goals:
        print(("met:     " if met else "NOT MET: ") + text)
        ok = ok and met
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6, help="model parameters (default 50e6)")
    parser.add_argument("--repeats", type=int, default=5, help="saves per method after the warm-up one")
    parser.add_argument("--out", help=argparse.SUPPRESS)  # set for the workers
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="dtrain-stall-") as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "--log-dir", str(Path(out, "torchrun")), __file__,
                   "--params", str(args.params), "--repeats", str(args.repeats), "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        subprocess.run(command, check=True, env=env)
        results = json.loads(Path(out, "results.json").read_text())
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
