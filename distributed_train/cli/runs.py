"""`dtrain runs [DIR]`: one line per run directory under DIR (default ./runs).

A run directory is any folder holding metrics.jsonl or summary.json. Columns: steps done/total,
done or incomplete, ranks, resumed, samples/s, final train loss and eval metrics, goodput (the share
of wall time, over every attempt, that became surviving progress; so far, for a run not done), last
update.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from distributed_train.cli import described
from distributed_train.cli.plot import CommandParser
from distributed_train.errors import UsageError
from distributed_train.files import path_problem
from distributed_train.storage import is_url
from distributed_train.training.reporting.goodput import breakdown, read_raw
from distributed_train.training.reporting.metrics import read_events
from distributed_train.training.reporting.progress import EVENT_FIELDS, format_duration

COLUMNS = ["RUN", "TASK", "STEPS", "STATUS", "RANKS", "RESUMED", "SAMPLES/S", "LOSS", "EVAL", "GOODPUT",
           "UPDATED"]
_RUN_FILES = ("metrics.jsonl", "summary.json")
_MAX_DEPTH = 4


def find_runs(root: Path) -> list[Path]:
    """Run directories under `root` (or root itself), oldest first; a run's subfolders are skipped.
    A run reached through symbolic links too (`latest -> run-7`) is listed once, under its own
    name where it is under `root`, else under the first link's."""
    found: dict[Path, tuple[bool, Path]] = {}  # real folder -> (reached through a link, shown as)

    def walk(folder: Path, depth: int, linked: bool) -> None:
        if any((folder / name).is_file() for name in _RUN_FILES):
            real = folder.resolve()
            if real not in found or (found[real][0] and not linked):
                found[real] = (linked, folder)
            return
        if depth >= _MAX_DEPTH:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, depth + 1, linked or child.is_symlink())

    walk(root, 0, False)
    return sorted((shown for _, shown in found.values()), key=_updated)


def _updated(run_dir: Path) -> float:
    times = [(run_dir / name).stat().st_mtime for name in _RUN_FILES if (run_dir / name).is_file()]
    return max(times, default=0.0)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _task_name(run_dir: Path, start: dict) -> str:
    task = start.get("task")
    if not task:
        try:
            task = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("task")
        except (OSError, yaml.YAMLError, AttributeError):
            task = None
    if not task:
        return "?"
    where, _, attr = str(task).rpartition(":")
    return f"{Path(where).name}:{attr}" if where else str(task)  # a file path: keep its name only


def describe(run_dir: Path, root: Path) -> dict[str, Any]:
    """What `dtrain runs` shows for one run directory, as plain values."""
    events = read_events(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    summary = _read_json(run_dir / "summary.json")
    starts = [e for e in events if e.get("kind") == "start"]
    start = starts[-1] if starts else {}
    train = [e for e in events if e.get("kind") == "train"]
    evals = [e for e in events if e.get("kind") == "eval"]
    step = max([e["step"] for e in events] + [summary.get("global_step") or 0])
    total = start.get("total_steps") or summary.get("global_step")
    done = bool(summary) and summary.get("global_step") == step and summary.get("status") != "failed"
    status = "done" if done else "failed" if summary.get("status") == "failed" else "incomplete"
    speeds = [e["samples_per_s"] for e in train if isinstance(e.get("samples_per_s"), (int, float))]
    eval_metrics = summary.get("eval") if done and summary.get("eval") else \
        {k: v for k, v in (evals[-1] if evals else {}).items() if k not in EVENT_FIELDS}
    return {
        "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        "task": _task_name(run_dir, start),
        "step": step, "total_steps": total,
        "status": status,
        "world_size": summary.get("world_size") or start.get("world_size"),
        "resumed": bool(summary.get("resumed_from")) or any(s.get("resumed") for s in starts),
        "samples_per_s": summary.get("samples_per_s") if done else (statistics.median(speeds) if speeds else None),
        "train_loss": summary.get("train_loss") if done else (train[-1]["loss"] if train else None),
        "eval": eval_metrics,
        "goodput": summary.get("goodput") if done and isinstance(summary.get("goodput"), dict) else
        (breakdown(read_raw(run_dir)) if events else None),
        "updated_s_ago": time.time() - _updated(run_dir),
    }


def _row(run: dict) -> list[str]:
    def num(value: Any, fmt: str) -> str:
        return fmt.format(value) if isinstance(value, (int, float)) else "-"

    steps = f"{run['step']}/{run['total_steps']}" if run["total_steps"] else str(run["step"])
    evals = " ".join(f"{k} {num(v, '{:.4f}')}" for k, v in sorted(run["eval"].items())) or "-"
    return [run["run"], run["task"], steps, run["status"], num(run["world_size"], "{}"),
            "yes" if run["resumed"] else "no", num(run["samples_per_s"], "{:,.0f}"),
            num(run["train_loss"], "{:.4f}"), evals, num((run["goodput"] or {}).get("goodput"), "{:.1%}"),
            format_duration(run["updated_s_ago"]) + " ago"]


def format_table(table: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, under the column names."""
    rows = [COLUMNS, *table]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str]) -> int:
    """`dtrain runs [DIR] [--json]`: a table (or JSON lines) of the runs under DIR."""
    parser = CommandParser(prog="dtrain runs", description=described(__doc__))
    parser.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="default: ./runs")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if is_url(args.dir):  # a bucket: each run's small files, copied to a temporary folder
        with tempfile.TemporaryDirectory() as folder:
            return _list(_fetch_runs(args.dir, Path(folder)), args.json, args.dir)
    root = Path(args.dir)
    if problem := path_problem(root, "directory"):
        raise UsageError(f"folder {str(root)!r} {problem}; pass the folder that holds your run directories")
    return _list(root, args.json, str(root))


def _fetch_runs(url: str, folder: Path) -> Path:
    """The runs under `url` as local folders under `folder` (named as below the URL)."""
    from distributed_train.storage import StorageError
    from distributed_train.training.mirror import fetch_run, find_runs

    try:
        for run in find_runs(url, _MAX_DEPTH):
            fetch_run(f"{url.rstrip('/')}/{run}" if run else url, folder / (run or url.rstrip("/").rsplit("/", 1)[-1]))
    except StorageError as exc:
        raise UsageError(str(exc)) from None
    return folder


def _list(root: Path, as_json: bool, shown: str) -> int:
    runs, table = [], []
    for path in find_runs(root):
        try:
            run = describe(path, root)
            table.append(_row(run))  # here: a summary.json of an odd shape fails for its own run only
            runs.append(run)
        except Exception as exc:  # noqa: BLE001 - one damaged run must not hide the others
            print(f"dtrain runs: skipping {path}: cannot read it ({type(exc).__name__}: "
                  f"{(str(exc).splitlines() or [''])[0][:120]})", file=sys.stderr)
    if not runs:
        print(f"no runs under {shown} (a run directory holds metrics.jsonl)")
        return 0
    if as_json:
        print("\n".join(json.dumps(run) for run in runs))
    else:
        print(format_table(table))
    return 0

