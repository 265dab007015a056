"""`dtrain train`: one training job in this process (world size from torchrun's variables, else 1)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import TextIO

from distributed_train.errors import (
    EXIT_USAGE,
    UsageError,
    count_sigints,
    print_error,
    refuse_signals_to_self,
    sigint_received,
    user_errors,
)


class RankPrefixed:
    """A text stream that writes whole lines only, each starting with `[rank N] ` (ranks other
    than 0: a task's print or warning appears once per rank; rank 0's, with no prefix, stays as
    the task wrote it). Every rank writes to the same pipe: a line written in one piece is never
    cut by another rank's (print() writes the text and its newline separately). Lines dtrain
    writes itself already name their rank (`dtrain: error: rank 1: ...`, `[rank 1] WARNING ...`)
    and pass unchanged, so that their first word stays `dtrain` for anything that reads them."""

    def __init__(self, stream: TextIO, rank: int):
        self._stream, self._prefix, self._partial = stream, f"[rank {rank}] " if rank else "", ""

    def write(self, text: str) -> int:
        pieces = []
        for piece in (self._partial + text).splitlines(keepends=True):
            if not piece.endswith(("\n", "\r")):
                self._partial = piece  # the start of a line: written with its end, or at flush()
                break
            pieces.append(self._prefixed(piece))
        else:
            self._partial = ""
        if pieces:
            self._stream.write("".join(pieces))
        return len(text)

    def _prefixed(self, line: str) -> str:
        return line if line.startswith(("dtrain", "[rank ")) else self._prefix + line

    def flush(self) -> None:
        if self._partial:
            self._stream.write(self._prefixed(self._partial))
            self._partial = ""
        self._stream.flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, buffer...: the real stream's
        return getattr(self._stream, name)


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """(config path or None, override arguments, --debug) from `[CONFIG] [--k=v ...] [--debug]`."""
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and not argv[0].startswith("--"):
        first = argv[0]
        if not first.endswith((".yaml", ".yml")) and (":" in first or first in _builtin_tasks()):
            return None, [f"--task={first}", *argv[1:]], debug  # `dtrain train charlm`
        return first, argv[1:], debug
    return None, argv, debug


def _builtin_tasks() -> dict:
    from distributed_train.task import BUILTIN_TASKS

    return BUILTIN_TASKS


def resolve_config(config_path: str | None, overrides: list[str]):
    """Load and validate the configuration, with the task's own defaults underneath."""
    from distributed_train.config import load_config
    from distributed_train.task import config_defaults

    return load_config(config_path, overrides, task_defaults=config_defaults)


def override_key(arg: str) -> str:
    """The setting an override names: `--checkpoint.grace-s=30` -> `checkpoint.grace_s`."""
    return arg.split("=", 1)[0].lstrip("-").replace("-", "_")


def stop_budget(config_path: str | None, overrides: list[str], config, window_s: int, flag: str) -> list[str]:
    """For a scheduler that leaves a stop checkpoint `window_s` seconds (its grace period, named by
    `flag`): `--checkpoint.grace_s=<window_s>` to add where the configuration leaves it at its
    default; [] where it sets it; UsageError where what it sets does not fit."""
    from distributed_train.config import CheckpointConfig, read_config_file

    named = any(override_key(o) == "checkpoint.grace_s" for o in overrides)
    section = (read_config_file(config_path) if config_path else {}).get("checkpoint")
    named = named or (isinstance(section, dict) and "grace_s" in section)
    if not named and config.checkpoint.grace_s == CheckpointConfig().grace_s:
        return [f"--checkpoint.grace_s={window_s}"]
    if config.checkpoint.grace_s > window_s:
        raise UsageError(f"checkpoint.grace_s={config.checkpoint.grace_s:g} does not fit {flag}: a checkpoint after "
                         f"SIGTERM has {window_s} s there; lower checkpoint.grace_s or raise {flag}")
    return []


def anchor_paths(config, start_dir: str) -> None:
    """run_dir (default: runs/<task>-<time>) and a checkpoint.resume path as absolute paths from
    the directory the job started in, so that a task's os.chdir() cannot move where the job writes.
    Rank 0's run_dir is the one every rank uses (broadcast when training starts)."""
    from distributed_train.storage import is_url
    from distributed_train.training.trainer import default_run_dir

    if not is_url(config.run_dir):  # a bucket's URL stays as it is
        config.run_dir = os.path.join(start_dir, os.path.expanduser(config.run_dir or default_run_dir(config.task)))
    if config.checkpoint.resume not in ("auto", "never"):
        config.checkpoint.resume = os.path.join(start_dir, os.path.expanduser(config.checkpoint.resume))


def _print_train_help() -> None:
    from distributed_train.config import describe

    print("usage: dtrain train [CONFIG.yaml | TASK] [--section.key=value ...] [--debug]\n")
    print("Runs one training job; under torchrun every worker runs it. Config keys (default):")
    for key, default, help_text in describe():
        print(f"  --{key:<34} {help_text} (default {default})")


def main(argv: list[str]) -> int:
    """`dtrain train`: one job in this process (world size from torchrun's variables, else 1)."""
    if "-h" in argv or "--help" in argv:
        _print_train_help()
        return 0
    start_dir = os.getcwd()  # task code may chdir (even on import); paths given here are relative to this
    config_path, overrides, debug = split_config_args(argv)
    stop_with_launcher()
    count_sigints()  # a KeyboardInterrupt without a Ctrl-C is task code's: a task failure
    from distributed_train import distributed
    from distributed_train.distributed.preemption import Preempted, print_stop

    refuse_signals_to_self()  # before any task code runs: a stop it sends itself is a task failure

    with user_errors(debug):  # a garbage torchrun variable (RANK=x) is this process's own: always say it
        env = distributed.read_env()
    if env.is_distributed:  # every rank runs the task's prints: tell them apart, never cut one
        sys.stdout, sys.stderr = RankPrefixed(sys.stdout, env.rank), RankPrefixed(sys.stderr, env.rank)
    config = None
    try:
        with user_errors(debug, quiet=not env.is_main):
            config = resolve_config(config_path, overrides)
            anchor_paths(config, start_dir)
            from distributed_train.training.run import run_training

            summary = run_training(config, env, debug=debug)
    except Preempted as exc:
        if env.is_main:
            print_stop(exc, _committed(config.run_dir, exc.step))
        return _exit_worker(env, exc.exit_code)
    except KeyboardInterrupt as exc:  # Ctrl-C before training started (or after it ended): nothing to save
        if not sigint_received():  # raised by task code where no task method is wrapped (a dataset's)
            from distributed_train.task import base_exception

            print_error(str(base_exception("task code", exc)))
            return _exit_worker(env, EXIT_USAGE)
        if env.is_main:
            print("dtrain: stopped by SIGINT before training started; nothing to resume", file=sys.stderr)
        return _exit_worker(env, 128 + signal.SIGINT)
    except SystemExit as exc:  # a usage error, a non-finite loss, lost peers: already explained
        return _exit_worker(env, exc.code if isinstance(exc.code, int) else 1)
    if env.is_main:
        evals = " ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in summary["eval"].items())
        loss = summary["train_loss"]  # None when a resumed run had no step left to train
        run_dir = os.path.dirname(summary["final_model"])
        shown = os.path.relpath(run_dir, start_dir) if run_dir.startswith(start_dir + os.sep) else run_dir
        print(f"done: {summary['global_step']} steps, train loss {'-' if loss is None else f'{loss:.4f}'}"
              f"{', eval ' + evals if evals else ''}; run dir {shown}", flush=True)
    return _exit_worker(env, 0)


# Set by `dtrain launch` for its workers: the launcher's pid, to notice it died before we started.
LAUNCHER_PID_VAR = "DTRAIN_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def stop_with_launcher() -> None:
    """A torchrun worker dies with its parent (the `dtrain launch` or torchrun process).

    Workers run in a session of their own: when the launcher is SIGKILLed (OOM killer, kill -9)
    nothing else would stop them and they would train on, orphaned. Linux only; elsewhere a no-op."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    launcher = os.environ.get(LAUNCHER_PID_VAR)
    if launcher and launcher.isdigit() and os.getppid() != int(launcher):
        os._exit(128 + signal.SIGKILL)  # the launcher died before the signal was armed


def _committed(run_dir: str | None, step: int) -> bool:
    """Whether a rerun has a checkpoint to resume from: the stop's (`step`) or, when the stop
    committed none (checkpoint.grace_s, NaN), an earlier one."""
    from pathlib import Path

    from distributed_train.storage import StorageError, Store, is_url
    from distributed_train.training.checkpoints import remote
    from distributed_train.training.checkpoints.commit import committed_checkpoints

    if is_url(run_dir):
        try:
            return any(found.step <= step for found in remote.committed(Store(run_dir))[0])
        except StorageError:
            return False
    return bool(run_dir) and any(int(path.name.split("-")[1]) <= step
                                 for path in committed_checkpoints(Path(run_dir) / "checkpoints"))


def _exit_worker(env, code: int) -> int:
    """Leave a torchrun worker without interpreter finalization once everything is written.

    With gloo, about one clean exit in 30 aborts during finalization ("terminate called without
    an active exception", pytorch/pytorch#190489): gloo threads still own tensors when the
    interpreter goes away. torchrun would report that as a failed worker, and restart it.
    """
    if not env.is_distributed:
        refuse_signals_to_self(False)  # this process goes on (a test, a notebook): signals are its own again
        return code
    from distributed_train.training.reporting.metrics import remove_wandb_temp_folders
    from distributed_train.training.workers import release_multiprocessing

    remove_wandb_temp_folders()  # what the skipped interpreter exit would have removed
    release_multiprocessing()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
