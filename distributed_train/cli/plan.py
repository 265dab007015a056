"""`dtrain plan`: the checkpoint interval that maximizes expected goodput for a job at scale, the
goodput to expect and where the rest goes, and which knob would buy the most.

    dtrain plan --gpus 16384 --mtbf-hours 3.1 --state-gib 5300 --write-s 300 --restart-s 600
    dtrain plan --gpus 8 --failures-per-gpu-hour 0.0001 --from-run runs/my-run

The model is Daly's (docs/goodput.md): failures at exponential times; each costs the restart and
the work since the last checkpoint; each checkpoint stalls training for the staging, and a save
cannot start before the previous one is written (so an interval shorter than the write time
stalls for the difference). `--from-run` takes the stall, write and restart times a run measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from distributed_train.cli import described
from distributed_train.cli.plot import CommandParser
from distributed_train.errors import EXIT_OK, UsageError
from distributed_train.training.reporting import goodput


def _parser() -> CommandParser:
    p = CommandParser(prog="dtrain plan", description=described(__doc__))
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) in the job")
    p.add_argument("--gpus-per-node", type=int, default=8, help="with --node-mtbf-hours (default 8)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--mtbf-hours", type=float, help="the whole job's mean time between interruptions")
    rate.add_argument("--failures-per-gpu-hour", type=float, help="interruptions per GPU-hour")
    rate.add_argument("--node-mtbf-hours", type=float, help="one node's mean time between failures")
    p.add_argument("--stall-s", type=float, help="seconds a checkpoint stops training (the staging copy)")
    p.add_argument("--state-gib", type=float, help="the whole training state (weights, optimizer); the "
                   "stall is then each GPU's share over --stage-gib-per-s")
    p.add_argument("--stage-gib-per-s", type=float, default=10.0,
                   help="device-to-host copy rate per GPU for --state-gib (default 10, pinned memory)")
    p.add_argument("--write-s", type=float, default=0.0, help="seconds to write a checkpoint in the background")
    p.add_argument("--restart-s", type=float, help="seconds from a failure to training again: noticing it, "
                   "restarting, startup, restore (default: measured by --from-run, else 300)")
    p.add_argument("--replace-s", type=float, default=0.0,
                   help="seconds to wait for a replacement node (not paid with --elastic)")
    p.add_argument("--elastic", action="store_true", help="go on with fewer nodes instead of waiting")
    p.add_argument("--from-run", metavar="RUN_DIR", help="take the stall, write and restart times a run measured")
    p.add_argument("--interval-minutes", type=float, help="also evaluate this interval")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the report")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _measured(run_dir: str) -> dict:
    """Stall, write and restart seconds from a run directory's metrics.jsonl (medians)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"--from-run {run_dir!r}: no metrics.jsonl there (a run directory holds one)")
    events = goodput.read_raw(path)
    saves = [e for e in events if e.get("kind") == "checkpoint" and isinstance(e.get("stall_s"), (int, float))]
    if not saves:
        raise UsageError(f"--from-run {run_dir!r}: the run saved no checkpoint, so nothing was measured")
    writes = [e["previous_write_s"] for e in saves if isinstance(e.get("previous_write_s"), (int, float))
              and e["previous_write_s"] > 0]
    parts = goodput.breakdown(events) or {}
    attempts = max(1, parts.get("attempts", 1))
    restart = (parts.get("startup", 0) + parts.get("restore", 0) + parts.get("between", 0)) / attempts
    costs = [e["write_cost_s"] for e in saves if isinstance(e.get("write_cost_s"), (int, float))]
    return {"stall_s": statistics.median(e["stall_s"] for e in saves),
            "write_s": statistics.median(writes) if writes else 0.0, "restart_s": restart,
            "write_cost_s": statistics.median(costs) if costs else 0.0}


def _inputs(args: argparse.Namespace) -> dict:
    measured = _measured(args.from_run) if args.from_run else {}
    for name in ("gpus", "gpus_per_node"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("mtbf_hours", "failures_per_gpu_hour", "node_mtbf_hours", "stall_s", "state_gib",
                 "stage_gib_per_s", "write_s", "restart_s", "replace_s", "interval_minutes"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and name in (
                "mtbf_hours", "failures_per_gpu_hour", "node_mtbf_hours", "stage_gib_per_s", "interval_minutes"))):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.mtbf_hours:
        mtbf_s = args.mtbf_hours * 3600
    elif args.failures_per_gpu_hour:
        mtbf_s = 3600 / (args.failures_per_gpu_hour * args.gpus)
    elif args.node_mtbf_hours:
        mtbf_s = args.node_mtbf_hours * 3600 / math.ceil(args.gpus / args.gpus_per_node)
    else:
        raise UsageError("dtrain plan needs a failure rate: --mtbf-hours, --failures-per-gpu-hour or --node-mtbf-hours")
    cost = 0.0  # the measured write's share of the cores: only with the measured stall, of the same job
    if args.stall_s is not None:
        stall = args.stall_s
    elif args.state_gib is not None:
        stall = args.state_gib / args.gpus / args.stage_gib_per_s
    elif measured:
        stall, cost = measured["stall_s"], measured["write_cost_s"]
    else:
        raise UsageError("dtrain plan needs the save stall: --stall-s, --state-gib or --from-run")
    restart = args.restart_s if args.restart_s is not None else measured.get("restart_s", 300.0)
    return {"gpus": args.gpus, "mtbf_s": mtbf_s, "stall_s": stall,
            "write_s": args.write_s or measured.get("write_s", 0.0),
            "write_cost_s": cost,
            "restart_s": restart + (0.0 if args.elastic else args.replace_s)}


def plan(inputs: dict, interval_s: float | None = None) -> dict:
    """The optimal interval, the expected breakdown there, and each knob's effect."""
    best = goodput.best_interval(inputs)

    def at(interval: float, values: dict) -> dict:
        shares = goodput.predicted_breakdown(interval, goodput.save_cost(interval, values), values["mtbf_s"],
                                             values["restart_s"])
        return {"interval_s": interval, **{k: round(v, 5) for k, v in shares.items()}}

    knobs = {"stall halved": {"stall_s": inputs["stall_s"] / 2}, "write halved": {"write_s": inputs["write_s"] / 2},
             "restart halved": {"restart_s": inputs["restart_s"] / 2}, "MTBF doubled": {"mtbf_s": inputs["mtbf_s"] * 2}}
    effects = {}
    for name, change in knobs.items():
        changed = {**inputs, **change}
        effects[name] = round(goodput.goodput_at(goodput.best_interval(changed), changed), 5)
    result = {"inputs": inputs, "optimal": at(best, inputs), "knobs": effects,
              "interval_x0.25": at(best / 4, inputs), "interval_x4": at(best * 4, inputs)}
    if interval_s:
        result["given"] = at(interval_s, inputs)
    return result


def _report(result: dict) -> str:
    inputs, best = result["inputs"], result["optimal"]
    lines = [f"job: {inputs['gpus']} GPU(s); one interruption every {inputs['mtbf_s'] / 3600:.2f} h; save stall "
             f"{inputs['stall_s']:.3g} s, write {inputs['write_s']:.3g} s; restart {inputs['restart_s']:.0f} s",
             f"checkpoint every {best['interval_s'] / 60:.2f} min of training "
             f"(checkpoint.every_minutes={best['interval_s'] / 60:.2f}, or checkpoint.interval=auto)",
             f"expected goodput {best['productive']:.2%}: checkpoint stalls {best['checkpoint']:.2%}, restarts "
             f"{best['restart']:.2%}, lost work {best['lost']:.2%}"]
    for label in ("given", "interval_x0.25", "interval_x4"):
        if label in result:
            row = result[label]
            lines.append(f"  every {row['interval_s'] / 60:.2f} min instead: goodput {row['productive']:.2%}")
    lines.append("what each knob would buy (goodput at its own best interval):")
    gains = sorted(result["knobs"].items(), key=lambda item: -item[1])
    lines += [f"  {name:<15} {value:.2%} ({100 * (value - best['productive']):+.1f} points)" for name, value in gains]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    result = plan(_inputs(args), args.interval_minutes * 60 if args.interval_minutes else None)
    print(json.dumps(result) if args.json else _report(result))
    return EXIT_OK
