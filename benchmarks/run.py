"""Run the plain torchrun+DDP loop and `dtrain launch` side by side and print a Markdown table.

    python benchmarks/run.py                      # all workloads, 3 alternating pairs (~5 min)
    python benchmarks/run.py --workloads digits --pairs 1 --scale 0.1

Runs alternate plain, ours, plain, ours ... so a machine that gets busier or quieter affects
both sides alike; the table shows medians and the median of the per-pair ratios. Numbers come
from each side's own output: plain.jsonl (plain) and metrics.jsonl (ours), each a line per log
step with a wall-clock time, so "in-loop samples/s" is measured the same way on both: samples
between the first and the last log step over the time between them (the first window, with
its warm-up, is left out).

Same math: before the timed pairs, a check pass runs both sides with the same kernels (the plain
loop also gets the fused AdamW and flushes denormals, as dtrain does) and compares the loss of
every log window: they must agree to LOSS_TOLERANCE. The timed pairs then run the plain loop as
the tutorial writes it; their final losses are shown, and only a gross difference fails (other
optimizer kernels round differently, and over hundreds of steps near a zero loss the
difference compounds, by a few percent on some CPUs).

On a machine with GPUs, `--device cuda` runs both sides on NCCL with one GPU per rank (default:
every visible GPU); the default `--device cpu` keeps both on gloo, even where GPUs exist.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import SEED, WORKLOADS, Workload, ensure_lm_tokens  # noqa: E402

CPU_NPROC = 2
LOSS_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-3}  # check pass, per window; relative (GPU kernels may use atomics)
FINAL_LOSS_SANITY = 0.1  # timed pairs: relative; beyond this the two sides did not train alike
CHECK_STEPS = 100
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Result:
    """One run of one side: what its own log says, and how long the whole process took."""

    samples_per_s: float
    wall_s: float
    cpu_s: float  # CPU time of every process of the run (agent and ranks), robust to a busy machine
    final_loss: float
    first_step_s: float  # from starting the command to the first log line's time
    window_losses: list  # (step, loss) of every log window
    state_bytes: int | None = None  # parameters + gradients + optimizer state of the largest rank


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env["WANDB_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH", "")]))
    return env


@dataclass
class Machine:
    """Where both sides run: the device kind and the ranks per side."""

    device: str  # cpu (gloo) or cuda (nccl, one GPU per rank)
    nproc: int
    engine: str = "ddp"  # ddp: plain_ddp.py (or the workload's own loop); fsdp: plain_fsdp.py


def plain_command(w: Workload, steps: int, log_every: int, out: Path, flags: list[str],
                  machine: Machine) -> list[str]:
    script = "plain_fsdp.py" if machine.engine == "fsdp" else w.plain_script
    if script == "lm_plain.py":  # its own loop: no device or kernel choice
        flags = [f for f in flags if f == "--flush-denormal"]
    else:
        flags = [*flags, f"--device={machine.device}"]
    # --log-dir: torchrun's error files go with the run (by default a torchelastic_* folder in TMPDIR, never removed)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={machine.nproc}",
            f"--log-dir={out / 'torchrun'}", str(HERE / script), f"--workload={w.name}", f"--steps={steps}",
            f"--log-every={log_every}", f"--out={out}", *flags]


def ours_command(w: Workload, steps: int, log_every: int, out: Path, extra: list[str],
                 machine: Machine) -> list[str]:
    task_args = [f"--task_args.{k}={v}" for k, v in w.task_args.items()]
    backend = "nccl" if machine.device == "cuda" else "gloo"  # gloo keeps a GPU machine's ranks on CPU
    return [sys.executable, "-m", "distributed_train", "launch", f"--nproc-per-node={machine.nproc}",
            f"--task={w.task}", *task_args, f"--seed={SEED}", f"--run_dir={out}",
            f"--train.batch_size={w.batch_per_rank * machine.nproc}", f"--train.lr={w.lr}",
            f"--train.max_steps={steps}", f"--log.every_steps={log_every}", "--log.wandb=disabled",
            f"--dist.backend={backend}", f"--engine={machine.engine}", *extra]


def read_events(path: Path) -> list[dict]:
    """Train log events (step, time, loss) from plain.jsonl or metrics.jsonl."""
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("kind", "train") == "train"]


EXIT_ABORT = "terminate called without an active exception"


def run_once(command: list[str], out: Path, log_name: str, batch: int, retries: int = 2) -> Result:
    """Run one side to completion and read its numbers; a failure shows the command's output."""
    if out.exists():  # a retry starts from scratch (our side would otherwise append to its log)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cpu_before = _children_cpu_s()
    start = time.time()
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          cwd=HERE.parent)
    wall = time.time() - start
    cpu = _children_cpu_s() - cpu_before
    # torch 2.13's gloo sometimes aborts a rank at exit ("terminate called without an active
    # exception", pytorch/pytorch#190489), after training: 1 plain run in 30 to 1 in 7 depending on
    # the machine (ours leaves through os._exit). Such a run is retried like any failure; when the
    # last try too aborted after writing its summary, it finished its work and its numbers stand.
    if proc.returncode != 0 and retries:
        print(f"  run failed (exit code {proc.returncode}), retrying: {' '.join(command[-4:])}",
              file=sys.stderr, flush=True)
        return run_once(command, out, log_name, batch, retries=retries - 1)
    finished = EXIT_ABORT in proc.stderr and (out / "summary.json").is_file()
    if proc.returncode != 0 and not finished:
        raise SystemExit(f"benchmark run failed ({proc.returncode}): {' '.join(command)}\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    events = read_events(out / log_name)
    first, last = events[0], events[-1]
    in_loop = (last["step"] - first["step"]) * batch / (last["time"] - first["time"]) \
        if len(events) > 1 else float("nan")
    return Result(in_loop, wall, cpu, last["loss"], first["time"] - start,
                  [(e["step"], e["loss"]) for e in events], read_state_bytes(out, log_name))


def read_state_bytes(out: Path, log_name: str) -> int | None:
    """Per-rank state bytes: our start event, or the plain loop's summary.json."""
    if log_name == "metrics.jsonl":
        start = json.loads((out / log_name).read_text().splitlines()[0])
        return start.get("state_bytes_per_rank")
    summary = out / "summary.json"
    return json.loads(summary.read_text()).get("state_bytes_per_rank") if summary.is_file() else None


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_pairs(w: Workload, pairs: int, steps: int, log_every: int, work: Path, args,
              machine: Machine) -> dict:
    """Alternate plain / ours `pairs` times; returns each side's results in run order."""
    batch = w.batch_per_rank * machine.nproc
    flags = ["--flush-denormal"] if args.plain_flush_denormal else []
    results: dict[str, list[Result]] = {"plain": [], "ours": []}
    for i in range(pairs):
        out = work / f"{w.name}-{steps}-{i}"
        results["plain"].append(run_once(plain_command(w, steps, log_every, out / "plain", flags, machine),
                                         out / "plain", "plain.jsonl", batch))
        results["ours"].append(run_once(ours_command(w, steps, log_every, out / "ours", args.ours, machine),
                                        out / "ours", "metrics.jsonl", batch))
        plain, ours = results["plain"][-1], results["ours"][-1]
        if steps > 1:
            shown = f"plain {plain.samples_per_s:.0f}/s, ours {ours.samples_per_s:.0f}/s"
        else:  # a start-up pair: one step, no in-loop rate
            shown = f"first step after plain {plain.first_step_s:.2f} s, ours {ours.first_step_s:.2f} s"
        print(f"  {w.name} pair {i + 1}/{pairs}: {shown}", file=sys.stderr, flush=True)
    return results


def median_ratio(top: list[float], bottom: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(top, bottom))


def losses_agree(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(abs(a), abs(b)) + 1e-7


def same_math_problem(w: Workload, work: Path, args, machine: Machine) -> str | None:
    """Run both sides once with the same kernels; None if every log window's loss agrees."""
    steps = min(w.steps, args.check_steps)
    log_every = max(1, min(w.log_every, steps // 10))
    batch = w.batch_per_rank * machine.nproc
    flags = ["--fused"] + (["--flush-denormal"] if machine.device == "cpu" else [])
    out = work / f"{w.name}-check"
    plain = run_once(plain_command(w, steps, log_every, out / "plain", flags, machine),
                     out / "plain", "plain.jsonl", batch)
    ours = run_once(ours_command(w, steps, log_every, out / "ours", args.ours, machine),
                    out / "ours", "metrics.jsonl", batch)
    return window_mismatch(w.name, plain.window_losses, ours.window_losses, LOSS_TOLERANCE[machine.device])


def window_mismatch(name: str, plain: list, ours: list, tolerance: float) -> str | None:
    """The first log window whose loss differs between the sides, or None when all agree."""
    if [s for s, _ in plain] != [s for s, _ in ours]:
        return f"{name}: the two sides logged different steps"
    for (step, a), (_, b) in zip(plain, ours):
        if not losses_agree(a, b, tolerance):
            return (f"{name}: with the same kernels the losses differ at step {step}: "
                    f"plain {a:.8g}, ours {b:.8g} (tolerance {tolerance:g} relative)")
    return None


def table_row(w: Workload, steps: int, results: dict, nproc: int) -> tuple[str, bool]:
    plain, ours = results["plain"], results["ours"]
    med = lambda rs, f: statistics.median(getattr(r, f) for r in rs)  # noqa: E731
    agree = all(losses_agree(p.final_loss, o.final_loss, FINAL_LOSS_SANITY) for p, o in zip(plain, ours))
    row = (f"| {w.name} | {w.batch_per_rank * nproc} | {steps} "
           f"| {med(plain, 'samples_per_s'):,.0f} | {med(ours, 'samples_per_s'):,.0f} "
           f"| **{median_ratio([r.samples_per_s for r in ours], [r.samples_per_s for r in plain]):.2f}x** "
           f"| {med(plain, 'wall_s'):.1f} | {med(ours, 'wall_s'):.1f} "
           f"| {median_ratio([r.wall_s for r in plain], [r.wall_s for r in ours]):.2f}x "
           f"| {med(plain, 'cpu_s'):.1f} | {med(ours, 'cpu_s'):.1f} "
           f"| {plain[-1].final_loss:.4f} / {ours[-1].final_loss:.4f}{'' if agree else ' DIFFER'} "
           f"| {_mib(plain[-1].state_bytes)} / {_mib(ours[-1].state_bytes)} |")
    return row, agree


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.1f}" if value else "?"


def machine_line(pairs: int, machine: Machine) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ranks = f"{machine.nproc} gloo ranks"
    if machine.device == "cuda":
        ranks = f"{machine.nproc} NCCL ranks on {torch.cuda.get_device_name(0)}"
    return (f"{datetime.date.today().isoformat()}, {cpu}, {cores} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}; {ranks}, median of {pairs} alternating pairs")


def pick_machine(device: str, nproc: int | None) -> Machine:
    """cpu: 2 ranks unless told; cuda: one rank per visible GPU unless told (never more)."""
    if device == "cpu":
        return Machine("cpu", nproc or CPU_NPROC)
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("run.py: error: --device cuda but no GPU is visible")
    if nproc and nproc > gpus:
        raise SystemExit(f"run.py: error: --nproc {nproc} but only {gpus} GPU(s) are visible")
    return Machine("cuda", nproc or gpus)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="plain torchrun+DDP vs dtrain, side by side")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--pairs", type=int, default=3, help="alternating plain/ours pairs per workload")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every workload's steps")
    parser.add_argument("--startup-pairs", type=int, default=3,
                        help="pairs of 1-step digits runs that time the start to the first step (0 = skip)")
    parser.add_argument("--plain-flush-denormal", action="store_true",
                        help="let the plain loop flush denormals too (the tutorial loop does not)")
    parser.add_argument("--ours", nargs=argparse.REMAINDER, default=[],
                        help="extra dtrain overrides for our side, e.g. --ours --engine=accelerate")
    parser.add_argument("--keep", help="keep run folders here (default: a temporary folder)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: both sides on gloo (default, also on GPU machines); cuda: both on NCCL")
    parser.add_argument("--nproc", type=int, help="ranks per side (default: 2 on cpu, every GPU on cuda)")
    parser.add_argument("--engine", choices=["ddp", "fsdp"], default="ddp",
                        help="fsdp: plain_fsdp.py (fully_shard per block) against dtrain --engine=fsdp")
    parser.add_argument("--check-steps", type=int, default=CHECK_STEPS,
                        help="steps of the same-math check pass per workload (0 = skip it)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or args.pairs < 1:
        print(f"run.py: error: unknown workload {unknown[0]!r}" if unknown else "run.py: error: --pairs must be >= 1",
              file=sys.stderr)
        return 2
    machine = pick_machine(args.device, args.nproc)
    machine.engine = args.engine
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
        work = Path(args.keep) / time.strftime("%Y%m%d-%H%M%S") if args.keep else Path(tmp)
        rows, all_agree, problems = [], True, []
        for name in names:
            w = WORKLOADS[name]
            if name == "lm":
                ensure_lm_tokens(w.task_args["train"])
            problem = same_math_problem(w, work, args, machine) if args.check_steps else None
            problems += [problem] if problem else []
            steps = max(2, round(w.steps * args.scale))
            log_every = max(1, min(w.log_every, steps // 2))
            row, agree = table_row(w, steps, run_pairs(w, args.pairs, steps, log_every, work, args, machine),
                                   machine.nproc)
            rows.append(row)
            all_agree &= agree
        startup = ""
        if args.startup_pairs:
            r = run_pairs(WORKLOADS["digits"], args.startup_pairs, 1, 1, work / "startup", args, machine)
            plain_s = statistics.median(x.first_step_s for x in r["plain"])
            ours_s = statistics.median(x.first_step_s for x in r["ours"])
            startup = (f"\nTime from starting the command to the end of the first step (digits, median): "
                       f"plain torchrun {plain_s:.2f} s, `dtrain launch` {ours_s:.2f} s "
                       f"({ours_s - plain_s:+.2f} s).\n")
    flush = " (plain loop with flush_denormal)" if args.plain_flush_denormal else ""
    print(f"{machine_line(args.pairs, machine)}{flush}.\n")
    print("| workload | global batch | steps | plain samples/s | ours samples/s | in-loop ratio "
          "| plain wall s | ours wall s | wall ratio | plain CPU s | ours CPU s | final loss plain / ours "
          "| state MiB/rank plain / ours |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    print("\n".join(rows))
    print(startup)
    if args.check_steps and not problems:
        print(f"Same math: with the same kernels both sides logged the same loss at every window of "
              f"the first {args.check_steps} steps (relative tolerance {LOSS_TOLERANCE[machine.device]:g}).")
    for problem in problems:
        print(f"ERROR: {problem}; the two sides did not run the same math", file=sys.stderr)
    if not all_agree:
        print(f"ERROR: final losses differ by more than {FINAL_LOSS_SANITY:.0%}: the two sides did not "
              "train alike", file=sys.stderr)
    return 1 if problems or not all_agree else 0


if __name__ == "__main__":
    sys.exit(main())
