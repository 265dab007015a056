"""`dtrain` subcommands. `train` runs a job in this process; `launch` starts workers via torchrun.

Exit codes: 0 done, 2 bad configuration or input (one line on stderr), 3 non-finite loss,
4 ranks could not talk (timeout, lost peer, rendezvous), 143 stopped by SIGTERM, 1 anything else.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from typing import Iterator

from .errors import EXIT_USAGE, TrainingFailure, UsageError

USAGE = """usage: dtrain COMMAND [...]

commands:
  train  [CONFIG|TASK] [--section.key=value ...]  run one training job in this process (or every torchrun worker)
  launch [torchrun options] [CONFIG] [...]    start local workers with torchrun, each running `dtrain train`
  plot RUN_DIR [-o FILE.png]                  loss / eval / throughput curves of a run
  runs [DIR]                                  table of the runs in a folder
  k8s ...                                     render Kubernetes manifests for a multi-node job
  doctor [--nproc-per-node N]                 preflight: environment, all-reduce bandwidth, matmul speed

`dtrain train --help` lists every config key; `dtrain COMMAND --help` for the others.
"""

# Commands implemented in their own modules, imported only when used (keeps `dtrain train` lean).
_MODULE_COMMANDS = {"plot": "plot", "runs": "runs", "k8s": "k8s", "doctor": "doctor"}


def _error(message: str) -> None:
    print(f"dtrain: error: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def user_errors(debug: bool, quiet: bool = False) -> Iterator[None]:
    """Turn UsageError into one line on stderr and exit code 2 (`--debug` keeps the traceback);
    a known TrainingFailure (non-finite loss, hang) into one line and its own exit code."""
    try:
        yield
    except UsageError as exc:
        if debug:
            raise
        if not quiet:
            _error(str(exc))
        raise SystemExit(EXIT_USAGE) from None
    except TrainingFailure as exc:
        if debug:
            raise
        if not quiet or exc.every_rank:
            _error(str(exc))
        raise SystemExit(exc.exit_code) from None


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
    from .task import BUILTIN_TASKS

    return BUILTIN_TASKS


def resolve_config(config_path: str | None, overrides: list[str]):
    """Load and validate the configuration, with the task's own defaults underneath."""
    from .config import load_config
    from .task import config_defaults

    return load_config(config_path, overrides, task_defaults=config_defaults)


def _print_train_help() -> None:
    from .config import describe

    print("usage: dtrain train [CONFIG.yaml] [--section.key=value ...] [--debug]\n")
    print("Runs one training job; under torchrun every worker runs it. Config keys (default):")
    for key, default, help_text in describe():
        print(f"  --{key:<34} {help_text} (default {default})")


def train_main(argv: list[str]) -> int:
    """`dtrain train`: one job in this process (world size from torchrun's variables, else 1)."""
    if "-h" in argv or "--help" in argv:
        _print_train_help()
        return 0
    config_path, overrides, debug = split_config_args(argv)
    from . import dist
    from .preemption import EXIT_PREEMPTED, Preempted

    with user_errors(debug):  # a garbage torchrun variable (RANK=x) is this process's own: always say it
        env = dist.read_env()
    try:
        with user_errors(debug, quiet=not env.is_main):
            config = resolve_config(config_path, overrides)
            from .run import run_training

            summary = run_training(config, env, debug=debug)
    except Preempted as exc:
        if env.is_main:
            print(f"dtrain: {exc}; a checkpoint was committed", file=sys.stderr, flush=True)
        return _exit_worker(env, EXIT_PREEMPTED)
    except SystemExit as exc:  # a usage error, a non-finite loss, lost peers: already explained
        return _exit_worker(env, exc.code if isinstance(exc.code, int) else 1)
    if env.is_main:
        evals = " ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items())
        print(f"done: {summary['global_step']} steps, train loss {summary['train_loss']:.4f}"
              f"{', eval ' + evals if evals else ''}; run dir {os.path.dirname(summary['final_model'])}",
              flush=True)
    return _exit_worker(env, 0)


def _exit_worker(env, code: int) -> int:
    """Leave a torchrun worker without interpreter finalization once everything is written.

    With gloo, about one clean exit in 30 aborts during finalization ("terminate called without
    an active exception", pytorch/pytorch#190489): gloo threads still own tensors when the
    interpreter goes away. torchrun would report that as a failed worker, and restart it.
    """
    if not env.is_distributed:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE, end="")
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command == "launch":
        from .launch import launch_main

        return launch_main(rest)
    if command in _MODULE_COMMANDS:
        module = importlib.import_module(f"{__package__}.{_MODULE_COMMANDS[command]}")
        with user_errors("--debug" in rest):
            return module.main(rest)
    _error(f"unknown command {command!r}; run `dtrain --help`")
    return EXIT_USAGE
