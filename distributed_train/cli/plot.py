"""`dtrain plot RUN_DIR [-o FILE.png]`: loss, eval, throughput and learning-rate curves of a run,
and where its wall time went (the goodput breakdown over every attempt).

Reads run_dir/metrics.jsonl (the final timeline of a resumed run) and writes one PNG. matplotlib
is an optional extra (`pip install 'distributed_train[plot]'`), imported only here.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from distributed_train.cli import described
from distributed_train.errors import UsageError
from distributed_train.files import require
from distributed_train.storage import StorageError, is_url
from distributed_train.training.mirror import fetch_run
from distributed_train.training.reporting.goodput import CATEGORIES, breakdown, read_raw
from distributed_train.training.reporting.metrics import read_events
from distributed_train.training.reporting.progress import EVENT_FIELDS


class CommandParser(argparse.ArgumentParser):
    """argparse whose mistakes become UsageError (one `dtrain: error:` line, exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def load_run(run_dir: Path, shown: str | None = None) -> list[dict]:
    """The run's log events; a missing or empty metrics.jsonl is a usage error that says why
    (naming the run as `shown`, the path or URL given)."""
    require(run_dir, "directory", "run directory")
    path = run_dir / "metrics.jsonl"
    where, run = (f"{shown.rstrip('/')}/metrics.jsonl", shown) if shown else (str(path), str(run_dir))
    if not path.is_file():
        raise UsageError(f"{where!r} does not exist: is {run!r} a run directory?")
    events = [e for e in read_events(path) if e.get("kind") in ("train", "eval")]
    if not events:
        raise UsageError(f"{where!r} has no train or eval events yet")
    return events


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("dtrain plot needs matplotlib: pip install 'distributed_train[plot]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _series(events: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in events
              if e.get("kind") == kind and isinstance(e.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _line(ax: Any, xs: list, ys: list, style: str = "-", **kwargs: Any) -> None:
    """A line, with markers when there are too few points to draw one (a single train row)."""
    if len(xs) <= 2 and "o" not in style:
        style += "o"
    ax.plot(xs, ys, style, **kwargs)


def _eval_names(events: list[dict]) -> list[str]:
    names = {k for e in events if e.get("kind") == "eval" for k in e if k not in EVENT_FIELDS | {"loss"}}
    return sorted(names)


def draw(events: list[dict], title: str, goodput: dict | None = None) -> Any:
    """Loss, eval metrics, throughput (and MFU), learning rate (and grad norm) in a 2x2 grid, and
    under them the goodput breakdown."""
    plt = _pyplot()
    fig = plt.figure(figsize=(11, 9.5))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.45])
    loss_ax, eval_ax, speed_ax, lr_ax = (fig.add_subplot(grid[i // 2, i % 2]) for i in range(4))
    _goodput_bar(fig.add_subplot(grid[2, :]), goodput)
    fig.suptitle(title)

    _line(loss_ax, *_series(events, "train", "loss"), label="train (mean over ranks)")
    _line(loss_ax, *_series(events, "eval", "loss"), "o-", label="eval")
    loss_ax.set(title="loss", xlabel="step")
    loss_ax.legend()

    names = _eval_names(events)
    for name in names:
        _line(eval_ax, *_series(events, "eval", name), "o-", label=name)
    eval_ax.set(title="eval metrics", xlabel="step")
    if names:
        eval_ax.legend()
    else:
        eval_ax.text(0.5, 0.5, "no eval metrics besides loss", ha="center", va="center",
                     transform=eval_ax.transAxes)

    _line(speed_ax, *_series(events, "train", "samples_per_s"), color="tab:green")
    speed_ax.set(title="throughput", xlabel="step", ylabel="samples/s")
    speed_ax.set_ylim(bottom=0)
    steps, mfu = _series(events, "train", "mfu")
    if mfu:
        twin = speed_ax.twinx()
        _line(twin, steps, [100 * m for m in mfu], color="tab:purple", alpha=0.6)
        twin.set_ylabel("MFU %", color="tab:purple")

    _line(lr_ax, *_series(events, "train", "lr"), color="tab:orange")
    lr_ax.set(title="learning rate and grad norm", xlabel="step", ylabel="lr")
    steps, norms = _series(events, "train", "grad_norm")
    if norms:
        twin = lr_ax.twinx()
        _line(twin, steps, norms, color="tab:gray", alpha=0.7)
        twin.set_ylabel("grad norm", color="tab:gray")
    fig.tight_layout()
    return fig


def _goodput_bar(ax: Any, parts: dict | None) -> None:
    """One bar of the wall time, split into the goodput categories, each with its share."""
    if not parts or not parts.get("wall_s"):
        ax.text(0.5, 0.5, "no goodput record in this run's metrics.jsonl", ha="center", va="center")
        ax.set_axis_off()
        return
    left = 0.0
    for name in CATEGORIES:
        if parts[name] > 0:
            ax.barh(0, parts[name], left=left, label=f"{name} {parts[name] / parts['wall_s']:.1%}")
            left += parts[name]
    ax.set(title=f"wall time {parts['wall_s']:.0f} s over {parts['attempts']} attempt(s): goodput "
                 f"{parts['goodput']:.1%}", xlabel="seconds", yticks=[])
    ax.legend(ncol=4, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.45))


def _title(run_dir: Path) -> str:
    starts = [e for e in read_events(run_dir / "metrics.jsonl") if e.get("kind") == "start"]
    if not starts:
        return run_dir.resolve().name
    last = starts[-1]
    resumed = f", resumed at step {last['step']}" if last.get("resumed") else ""
    return f"{run_dir.resolve().name}: {last.get('task')} on {last.get('world_size')} rank(s){resumed}"


def main(argv: list[str]) -> int:
    """`dtrain plot RUN_DIR [-o FILE.png]`; prints the path it wrote."""
    parser = CommandParser(prog="dtrain plot", description=described(__doc__))
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("-o", "--output", metavar="FILE.png", help="default: RUN_DIR/metrics.png")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if is_url(args.run_dir):  # a bucket: its metrics.jsonl, copied to a temporary folder
        name = args.run_dir.rstrip("/").rsplit("/", 1)[-1]
        with tempfile.TemporaryDirectory() as folder:
            try:
                run_dir = fetch_run(args.run_dir, Path(folder) / name)
            except StorageError as exc:
                raise UsageError(str(exc)) from None
            return _plot(run_dir, Path(args.output or f"{name}-metrics.png"), args.run_dir)
    return _plot(Path(args.run_dir), Path(args.output) if args.output else None, None)


def _plot(run_dir: Path, output: Path | None, shown: str | None) -> int:
    """Draw `run_dir`'s metrics into `output` (default RUN_DIR/metrics.png); `shown`: the URL given."""
    events = load_run(run_dir, shown)
    output = output or run_dir / "metrics.png"
    if output.suffix.lower() != ".png":
        raise UsageError(f"-o {str(output)!r}: dtrain plot writes PNG files; name it FILE.png")
    fig = draw(events, _title(run_dir), breakdown(read_raw(run_dir)))
    try:
        fig.savefig(output, dpi=100)
    except OSError as exc:
        raise UsageError(f"cannot write {str(output)!r}: {exc.strerror}") from None
    print(output)
    return 0
