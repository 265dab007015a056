"""`dtrain train`: one training job in this process (world size from torchrun's variables, else 1)."""

from __future__ import annotations

import logging
import os
import sys

from distributed_train.errors import EXIT_PREEMPTED, user_errors


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


def _print_train_help() -> None:
    from distributed_train.config import describe

    print("usage: dtrain train [CONFIG.yaml] [--section.key=value ...] [--debug]\n")
    print("Runs one training job; under torchrun every worker runs it. Config keys (default):")
    for key, default, help_text in describe():
        print(f"  --{key:<34} {help_text} (default {default})")


def main(argv: list[str]) -> int:
    """`dtrain train`: one job in this process (world size from torchrun's variables, else 1)."""
    if "-h" in argv or "--help" in argv:
        _print_train_help()
        return 0
    config_path, overrides, debug = split_config_args(argv)
    from distributed_train import dist
    from distributed_train.dist.preemption import Preempted

    with user_errors(debug):  # a garbage torchrun variable (RANK=x) is this process's own: always say it
        env = dist.read_env()
    try:
        with user_errors(debug, quiet=not env.is_main):
            config = resolve_config(config_path, overrides)
            from distributed_train.training.run import run_training

            summary = run_training(config, env, debug=debug)
    except Preempted as exc:
        if env.is_main:
            print(f"dtrain: {exc}; a checkpoint was committed", file=sys.stderr, flush=True)
        return _exit_worker(env, EXIT_PREEMPTED)
    except SystemExit as exc:  # a usage error, a non-finite loss, lost peers: already explained
        return _exit_worker(env, exc.code if isinstance(exc.code, int) else 1)
    if env.is_main:
        evals = " ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in summary["eval"].items())
        loss = summary["train_loss"]  # None when a resumed run had no step left to train
        print(f"done: {summary['global_step']} steps, train loss {'-' if loss is None else f'{loss:.4f}'}"
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
