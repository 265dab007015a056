"""`dtrain` subcommands: `train` runs a job in this process, `launch` starts workers via torchrun,
the others inspect runs, render manifests and check the machine. Exit codes: errors.py."""

from __future__ import annotations

import importlib
import sys

from distributed_train.errors import EXIT_USAGE, print_error, user_errors

# The one list of commands: (name, arguments, what it does). Each lives in its own module of this
# package (`prepare-tokens` -> prepare_tokens.py), imported only when used (keeps `dtrain train`
# lean); each has `main(argv) -> exit code`.
COMMANDS = {
    "train": ("[CONFIG|TASK] [--section.key=value ...]",
              "run one training job in this process (or every torchrun worker)"),
    "launch": ("[torchrun options] [CONFIG] [...]", "start local workers with torchrun, each running `dtrain train`"),
    "plot": ("RUN_DIR [-o FILE.png]", "loss / eval / throughput curves of a run"),
    "runs": ("[DIR]", "table of the runs in a folder"),
    "k8s": ("...", "render Kubernetes manifests for a multi-node job"),
    "slurm": ("... [--submit]", "a Slurm batch script for a multi-node job (stops and requeues with a checkpoint)"),
    "doctor": ("[--nproc-per-node N]", "preflight: environment, all-reduce bandwidth, matmul speed"),
    "prepare-tokens": ("INPUT... -o DIR", "text -> token shards + meta.json for `--task=lm --task_args.data=DIR`"),
    "export": ("CHECKPOINT_OR_RUN_DIR -o FILE", "the consolidated model of a checkpoint (.pt or .safetensors)"),
    "estimate": ("[CONFIG] [--nproc-per-node N] [--nnodes M] [--gpu-memory-gib G]",
                 "per-rank memory of ddp, fsdp and HSDP (model on the meta device)"),
    "plan": ("--gpus N --mtbf-hours H --stall-s S [...]",
             "the checkpoint interval that maximizes goodput at scale, and what to expect"),
}


def described(doc: str) -> str:
    """A command module's docstring's first paragraph on one line: its `--help` description."""
    return " ".join(doc.split("\n\n")[0].split())


def split_options(parser, argv: list[str], never: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(the options `parser` knows, with their values; everything else: CONFIG and `--key=value`
    overrides) from one mixed command line, by option name (`never`: names left to the rest)."""
    actions = parser._option_string_actions
    ours, rest = [], []
    i = 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        action = actions.get(name) if argv[i].startswith("-") and name not in never else None
        if action is None:
            rest.append(argv[i])
        else:
            ours.append(argv[i])
            if "=" not in argv[i] and action.nargs != 0 and i + 1 < len(argv):
                ours.append(argv[i + 1])
                i += 1
        i += 1
    return ours, rest


def usage() -> str:
    """`dtrain --help`: every command of COMMANDS with its arguments and what it does."""
    lines = ["usage: dtrain COMMAND [...]", "", "commands:"]
    for name, (arguments, what) in COMMANDS.items():
        synopsis = f"  {name} {arguments}"
        lines += [f"{synopsis:<46}{what}"] if len(synopsis) < 46 else [synopsis, f"{'':<46}{what}"]
    lines += ["", "`dtrain train --help` lists every config key; `dtrain COMMAND --help` for the others."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Dispatch `dtrain COMMAND ...` (also `python -m distributed_train`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage(), end="")
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print_error(f"unknown command {command!r}; run `dtrain --help`")
        return EXIT_USAGE
    module = importlib.import_module(f"{__name__}.{command.replace('-', '_')}")
    with user_errors("--debug" in rest):
        return module.main(rest)
