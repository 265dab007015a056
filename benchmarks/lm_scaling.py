"""Does the lm task's start-up grow with the corpus? A 4 GB token file against a 40 MB one.

    python benchmarks/lm_scaling.py [--big-gb 4] [--small-mb 40] [--runs 2]

Both files are sparse (created with truncate: all-zero tokens, no disk written), which is what
the claim is about: nothing is read up front, so only the windows a step touches are paged in.
Each run is `dtrain launch --nproc-per-node 2 lm` for 3 steps; reported: time from the command's
start to the end of the first step (metrics.jsonl) and the peak resident memory of the largest
process (a rank; ru_maxrss of the waited-for descendants, measured in a fresh wrapper per run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Runs `dtrain launch` and prints the peak RSS (KiB) of its descendants: a fresh process per run,
# so the maximum is this run's only.
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")


def run(tokens: Path, work: Path) -> tuple[float, float]:
    """(seconds to the end of the first step, peak RSS MiB of one process) of one short run."""
    run_dir = work / f"run-{time.time_ns()}"
    command = [sys.executable, "-m", "distributed_train", "launch", "--nproc-per-node", "2", "lm",
               f"--task_args.train={tokens}", "--task_args.vocab_size=256", "--task_args.seq_len=256",
               "--train.batch_size=8", "--train.max_steps=3", "--log.every_steps=1", "--eval.max_samples=16",
               "--log.wandb=disabled", f"--run_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, env=env)
    rss_kib, rc = proc.stdout.split()[-2:]
    if rc != "0":
        raise SystemExit(f"run failed:\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(e for e in events if e.get("kind") == "train")
    return first["time"] - start, int(rss_kib) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-gb", type=float, default=4.0)
    parser.add_argument("--small-mb", type=float, default=40.0)
    parser.add_argument("--runs", type=int, default=2, help="alternating runs per file (medians)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtrain-lm-scaling-") as tmp:
        work = Path(tmp)
        files = {"small": (work / "small.bin", int(args.small_mb * 1e6)),
                 "big": (work / "big.bin", int(args.big_gb * 1e9))}
        for path, size in files.values():
            with open(path, "wb") as f:
                f.truncate(size - size % 2)  # sparse: no blocks written
        results: dict[str, list[tuple[float, float]]] = {"small": [], "big": []}
        for _ in range(args.runs):
            for name, (path, _) in files.items():
                results[name].append(run(path, work))
                print(f"  {name}: first step {results[name][-1][0]:.2f} s, peak RSS {results[name][-1][1]:.0f} MiB",
                      file=sys.stderr, flush=True)
    rows = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for name, rs in results.items()}
    print("| token file | time to first step s | peak RSS per rank MiB |\n| --- | ---: | ---: |")
    for name, (path, size) in files.items():
        print(f"| {size / 1e6:,.0f} MB ({name}) | {rows[name][0]:.2f} | {rows[name][1]:.0f} |")
    time_ratio, rss_ratio = rows["big"][0] / rows["small"][0], rows["big"][1] / rows["small"][1]
    print(f"\nbig / small: time to first step {time_ratio:.2f}x, peak RSS {rss_ratio:.2f}x (goal: within 1.10x)")
    return 0 if time_ratio <= 1.1 and rss_ratio <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
