"""Goodput under injected failures: the measured goodput against `dtrain plan`'s prediction for the
same measured costs and failure rate, and `checkpoint.interval=auto` against fixed intervals 4x
shorter and 4x longer.

Each configuration runs the same CPU job (`dtrain launch`, 2 ranks, `--max-restarts`) while this
script SIGKILLs one of its workers at exponentially distributed times (a seeded mean; the same
times, counted from each job's start, for every configuration, and the same choice of worker).
torchrun restarts the workers, which resume from the last committed checkpoint. After each job:

- measured: the job's goodput breakdown (summary.json) without the first start-up, which the model
  does not have: (productive + data wait + evaluation) / (wall - first start-up);
- predicted: Daly's model at the interval the job used (goodput.goodput_at), for the stall,
  write time and write cost (the write's CPU time, taken from training's cores) its checkpoints
  measured, its restart cost (start-up, restore and time between
  attempts, per restart) and its failure rate (kills / wall time).

    python benchmarks/goodput_validation.py                  # ~12 min on 2 cores
    python benchmarks/goodput_validation.py --short          # one kill, one configuration (~30 s)

Prints a Markdown table, then one line per goal; exit 0 when every goal holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distributed_train.training.reporting import goodput  # noqa: E402

JOB = ["--nproc-per-node", "2", "--task_args.hidden=2048", "--train.batch_size=64", "--log.every_steps=20",
       "--eval.every_steps=0", "--log.wandb=disabled", "--max-restarts", "1000", "--dist.timeout_s=60"]


def kill_times(mean_s: float, seed: int, horizon_s: float) -> list[float]:
    """Seconds after a job's start at which a worker is killed (exponential gaps)."""
    rng, times, t = random.Random(seed), [], 0.0
    while t < horizon_s:
        t += rng.expovariate(1 / mean_s)
        times.append(t)
    return times


def workers(launcher: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in launcher.children(recursive=True):
        try:
            if "train" in child.cmdline() and "distributed_train" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return sorted(found, key=lambda p: p.pid)


def run_job(run_dir: Path, steps: int, checkpoint: list[str], kills: list[float], seed: int,
            after_checkpoint: bool = False) -> dict:
    """One job with kills at `kills` seconds after its start (`after_checkpoint`: after its first
    committed checkpoint, so the killed attempt has recorded its start); returns its facts."""
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    start = time.monotonic()
    launcher = subprocess.Popen([sys.executable, "-m", "distributed_train", "launch", *JOB, *checkpoint,
                                 f"--train.max_steps={steps}", f"--run_dir={run_dir}"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
    agent, chooser, done = psutil.Process(launcher.pid), random.Random(seed + 1), 0
    while launcher.poll() is None:
        if after_checkpoint and not list(run_dir.glob("checkpoints/step-*/COMMITTED")):
            start = time.monotonic()
        elif done < len(kills) and time.monotonic() - start >= kills[done]:
            alive = workers(agent)
            if alive:  # between a kill and the restart there may be none: the kill waits
                victim = chooser.choice(alive)
                try:
                    victim.send_signal(signal.SIGKILL)
                    done += 1
                except psutil.Error:
                    pass
        time.sleep(0.02)
    if launcher.returncode != 0:
        raise SystemExit(f"{run_dir.name}: dtrain launch exited {launcher.returncode}; see {log.name}")
    summary = json.loads((run_dir / "summary.json").read_text())
    events = goodput.read_raw(run_dir)
    saves = [e for e in events if e.get("kind") == "checkpoint" and not e.get("on_stop")]
    writes = [e["previous_write_s"] for e in saves if e.get("previous_write_s")]
    costs = [e["write_cost_s"] for e in saves if e.get("previous_write_s")]
    chosen = [e["interval_s"] for e in saves[1:] if e.get("interval_s")]
    return {"parts": summary["goodput"], "kills": done, "first_startup": events[0].get("startup_s", 0.0),
            "stall_s": statistics.median(e["stall_s"] for e in saves),
            "write_s": statistics.median(writes) if writes else 0.0,
            "write_cost_s": statistics.median(costs) if costs else 0.0,
            "interval_s": statistics.median(chosen) if chosen else None}


def compare(name: str, job: dict) -> dict:
    """Measured and predicted goodput of one job (see the module docstring)."""
    parts, kills = job["parts"], max(1, job["kills"])
    wall = parts["wall_s"] - job["first_startup"]
    measured = (parts["productive"] + parts["data_wait"] + parts["evaluation"]) / wall
    restart = (parts["startup"] - job["first_startup"] + parts["restore"] + parts["between"]) / kills
    inputs = {"stall_s": job["stall_s"], "write_s": job["write_s"], "write_cost_s": job["write_cost_s"],
              "mtbf_s": wall / kills, "restart_s": restart}
    predicted = goodput.goodput_at(job["interval_s"], inputs)
    return {"config": name, "interval_s": job["interval_s"], "kills": job["kills"], "wall_s": parts["wall_s"],
            "measured": measured, "predicted": predicted, "goodput": parts["goodput"], **inputs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mean-s", type=float, default=30.0, help="mean seconds between kills (default 30)")
    parser.add_argument("--steps", type=int, default=5000, help="training steps per job (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short", action="store_true", help="one kill, one configuration (a smoke test)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the jobs' run directories and logs (else kept only when a goal fails)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dtrain-goodput-"))
    rows = []
    if args.short:
        job = run_job(folder / "short", 600, ["--checkpoint.every_minutes=0.02"], [1.0], args.seed,
                      after_checkpoint=True)
        rows.append(compare("every 1.2 s, one kill", {**job, "interval_s": job["interval_s"] or 1.2}))
    else:
        kills = kill_times(args.mean_s, args.seed, horizon_s=3600)
        auto = run_job(folder / "auto", args.steps, ["--checkpoint.interval=auto",
                                                     f"--checkpoint.mtbf_hours={args.mean_s / 3600}"], kills, args.seed)
        rows.append(compare("auto", auto))
        for factor in (0.25, 4.0):
            minutes = auto["interval_s"] * factor / 60
            job = run_job(folder / f"x{factor:g}", args.steps, [f"--checkpoint.every_minutes={minutes:.6f}"],
                          kills, args.seed)
            rows.append(compare(f"fixed, auto x{factor:g}", {**job, "interval_s": job["interval_s"] or minutes * 60}))
    print("| configuration | interval s | kills | wall s | stall s | write s | write cost s | restart s "
          "| goodput measured | predicted | difference |\n" + "| --- " * 11 + "|")
    for r in rows:
        print(f"| {r['config']} | {r['interval_s']:.2f} | {r['kills']} | {r['wall_s']:.0f} | {r['stall_s']:.3f} | "
              f"{r['write_s']:.3f} | {r['write_cost_s']:.3f} | {r['restart_s']:.1f} | {r['measured']:.1%} | "
              f"{r['predicted']:.1%} | "
              f"{100 * (r['measured'] - r['predicted']):+.1f} points |")
    goals = [(f"{r['config']}: measured within 5 points of predicted", abs(r["measured"] - r["predicted"]) <= 0.05)
             for r in rows]
    if not args.short:
        goals.append(("auto at least as good as 4x shorter and 4x longer",
                      rows[0]["measured"] >= max(r["measured"] for r in rows[1:])))
    for goal, ok in goals:
        print(f"{'PASS' if ok else 'FAIL'}: {goal}")
    if args.keep or not all(ok for _, ok in goals):
        print(f"the jobs' run directories and logs are kept in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "mean_s": args.mean_s, "seed": args.seed,
                                              "cpus": os.cpu_count()}, indent=1))
    return 0 if all(ok for _, ok in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
