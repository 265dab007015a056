"""`dtrain slurm`: print (or submit) the Slurm batch script that runs a config on N nodes.

    dtrain slurm --nodes 2 --gpus-per-node 8 --time 04:00:00 [CONFIG] [--key=value ...] [--submit]

The script is plain bash with `#SBATCH` lines, commented, runnable by hand (`sbatch FILE`). It
starts one `dtrain launch` per node with srun (which derives the node count, this node's rank and
the rendezvous from Slurm's variables), asks Slurm for USR1 `--signal-before` seconds before the
time limit and turns it into the agreed stop on every node (a committed checkpoint, exit 143),
and requeues the job after any such stop, so that the requeued job (same job id) resumes from
the checkpoint. The config is validated here first; a bad one exits 2 before anything is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

from distributed_train.cli import described
from distributed_train.errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # partition, account, qos, job name: no spaces, no quotes
# Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
STOP_CODES = (143, 129, 130)  # stopped after committing a checkpoint (errors.py): requeue to continue


def _parser() -> argparse.ArgumentParser:
    from distributed_train.cli.plot import CommandParser

    p = CommandParser(prog="dtrain slurm", description=described(__doc__),
                epilog="Anything else on the command line is CONFIG and --section.key=value overrides, "
                       "validated now and passed to every node.")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node: one worker each (default 0: CPU)")
    p.add_argument("--procs-per-node", type=int, default=2, help="without GPUs: workers per node (default 2)")
    p.add_argument("--cpus-per-node", type=int, help="CPUs per node (default 8 per GPU, else 1 per worker)")
    p.add_argument("--time", help="time limit, e.g. 04:00:00 or 1-12:00:00 (default: the partition's)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--qos", help="Slurm QOS")
    p.add_argument("--job-name", default="dtrain", help="job name; also runs/NAME, the default run_dir")
    p.add_argument("--output", help="log file (default slurm-NAME-JOBID.out; a requeued job appends to it)")
    p.add_argument("--container-image", help="pyxis/enroot sites: run every node in this image")
    p.add_argument("--signal-before", type=int, default=120, metavar="SECONDS",
                   help="USR1 this long before the time limit: stop with a checkpoint, then requeue (default 120)")
    p.add_argument("--no-requeue", action="store_true", help="do not requeue the job after a stop")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--submit", action="store_true", help="run sbatch with the script and print the job id")
    return p


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our flags, CONFIG and overrides) from one mixed command line, by our option names."""
    from distributed_train.cli import split_options

    return split_options(_parser(), argv)


def check(options: argparse.Namespace) -> None:
    """Every value Slurm or bash would misread is one line naming the flag."""
    for flag, value, low in (("--nodes", options.nodes, 1), ("--gpus-per-node", options.gpus_per_node, 0),
                             ("--procs-per-node", options.procs_per_node, 1),
                             ("--cpus-per-node", options.cpus_per_node, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if not 30 <= options.signal_before <= 65535:
        raise UsageError(f"--signal-before must be 30 to 65535 seconds (time to commit a checkpoint), "
                         f"got {options.signal_before}")
    if options.time is not None and not _TIME.match(options.time):
        raise UsageError(f"--time {options.time!r} is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS, ...)")
    for flag in ("partition", "account", "qos", "job_name"):
        value = getattr(options, flag)
        if value is not None and not _NAME.match(value):
            raise UsageError(f"--{flag.replace('_', '-')} {value!r}: letters, digits and _ . + - only")
    for flag, value in [("--output", options.output), ("--container-image", options.container_image),
                        *(("--sbatch", line) for line in options.sbatch)]:
        if value is not None and (not value.strip() or any(c in value for c in "\n\r\0")):
            raise UsageError(f"{flag} {value!r} must be one non-empty line")
    for line in options.sbatch:
        if not line.startswith("-"):
            raise UsageError(f"--sbatch {line!r} must be an sbatch option (e.g. --exclusive)")


def resolve(train: list[str], signal_before: int | None = None) -> tuple[str | None, list[str], str]:
    """(CONFIG, overrides, run_dir) validated as `dtrain train` would read them; with
    `signal_before`, checkpoint.grace_s fitted to it is added where the config leaves it unset
    (torchrun SIGKILLs the workers 10 s before the time limit: `_srun_line`)."""
    from distributed_train.cli.train import resolve_config, split_config_args, stop_budget

    train = [a for a in train if a != "--debug"]
    train.sort(key=lambda arg: arg.startswith("-"))  # CONFIG first, wherever it was given (a stable sort)
    config_path, overrides, _ = split_config_args(train)
    config = resolve_config(config_path, overrides)
    if not config.checkpoint.periodic:
        print("dtrain slurm: warning: checkpoint.every_steps is 0: a node lost without a signal restarts the "
              "run from step 0; set checkpoint.every_steps", file=sys.stderr)
    if signal_before is not None:
        overrides = [*stop_budget(config_path, overrides, config, signal_before - 15,
                                  f"--signal-before {signal_before}"), *overrides]
    return config_path, overrides, config.run_dir or ""


def _sbatch_lines(options: argparse.Namespace, output: str) -> list[str]:
    """The #SBATCH options, commented where the reason is not obvious."""
    workers = options.gpus_per_node or options.procs_per_node
    cpus = options.cpus_per_node or (8 * options.gpus_per_node if options.gpus_per_node else workers)
    lines = [f"--job-name={options.job_name}", f"--nodes={options.nodes}",
             "--ntasks-per-node=1  # one `dtrain launch` per node: it starts the node's workers",
             f"--cpus-per-task={cpus}"]
    lines += [f"--gpus-per-node={options.gpus_per_node}"] if options.gpus_per_node else []
    lines += [f"--{flag}={value}" for flag, value in (("time", options.time), ("partition", options.partition),
                                                      ("account", options.account), ("qos", options.qos)) if value]
    lines += [f"--chdir={os.getcwd()}  # relative paths below are from here",
              f"--output={output}", "--open-mode=append  # a requeued job appends to the same log",
              f"--signal=B:USR1@{options.signal_before}  # USR1 to this script before the time limit (below)"]
    lines += [] if options.no_requeue else ["--requeue  # a stopped job goes back into the queue"]
    return lines + options.sbatch


def _srun_line(options: argparse.Namespace, config_path: str | None, overrides: list[str]) -> str:
    """srun starting one `dtrain launch` per node (in the container, if any)."""
    python = "dtrain" if options.container_image else f"{shlex.quote(sys.executable)} -m distributed_train"
    container = [f"--container-image={shlex.quote(options.container_image)}", '--container-mounts="$PWD:$PWD"',
                 '--container-workdir="$PWD"'] if options.container_image else []
    from distributed_train.cli.train import override_key

    overrides = [o for o in overrides if override_key(o) != "run_dir"]  # RUN_DIR has it
    launch = [*(["--nproc-per-node", str(options.procs_per_node)] if not options.gpus_per_node else []),
              # torchrun's SIGKILL (30 s after SIGTERM by default) only shortly before the time limit
              "--shutdown-timeout", str(options.signal_before - 10),
              *([shlex.quote(config_path)] if config_path else []), *map(shlex.quote, overrides),
              '--run_dir="$RUN_DIR"']
    return " ".join(["srun --kill-on-bad-exit=1", *container, python, "launch", *launch])


def script(options: argparse.Namespace, config_path: str | None, overrides: list[str], run_dir: str,
           shown_argv: list[str]) -> str:
    """The batch script's text."""
    run_dir = run_dir or f"runs/{options.job_name}"
    output = options.output or "slurm-%x-%j.out"  # Slurm opens it before the script runs: no new folder
    shown_output = output.replace("%x", options.job_name).replace("%j", "JOBID")
    requeue = "" if options.no_requeue else f'''
# Stopped after committing a checkpoint ({", ".join(map(str, STOP_CODES))}: the time limit, scancel --signal=TERM, a
# preemption): back into the queue; the requeued job (same job id) resumes from the checkpoint.
case "$code" in {"|".join(map(str, STOP_CODES))}) scontrol requeue "$SLURM_JOB_ID" || true ;; esac'''
    return f'''#!/bin/bash
# Generated by: dtrain slurm {" ".join(map(shlex.quote, shown_argv))}
# Submit: sbatch THIS_FILE   Watch: squeue -j JOBID; tail -f {shown_output}
{chr(10).join("#SBATCH " + line for line in _sbatch_lines(options, output))}

# The run directory: one every node sees (a shared file system), or a bucket (s3://...).
# A requeued job continues from its last committed checkpoint there (checkpoint.resume=auto).
RUN_DIR={shlex.quote(run_dir)}

# USR1 (before the time limit) or `scancel --signal=USR1 --batch`: every node gets TERM; every
# rank stops after the same step, rank 0 commits a checkpoint, and the workers exit 143.
stopping=0
stop() {{ stopping=1; echo "dtrain slurm: stopping job $SLURM_JOB_ID with a checkpoint"; \\
         scancel --signal=TERM "$SLURM_JOB_ID"; }}
trap stop USR1 TERM

# One agent per node; it reads SLURM_* for --nnodes, its node rank and the rendezvous.
{_srun_line(options, config_path, overrides)} &
step=$!
while :; do  # a trapped signal interrupts `wait`: wait again for the step's own exit code
    wait "$step"; code=$?
    if [ "$stopping" -eq 1 ] && [ "$code" -gt 128 ] && kill -0 "$step" 2>/dev/null; then stopping=0; continue; fi
    break
done
{requeue}
exit "$code"
'''


def main(argv: list[str]) -> int:
    if argv and argv[0] in JOB_COMMANDS:
        return job_command(argv[0], argv[1:])
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        print("\nA submitted job: dtrain slurm status JOBID | logs JOBID [--follow] | cancel JOBID")
        return 0
    ours, train = split_args(argv)
    options = _parser().parse_args(ours)
    check(options)
    config_path, overrides, run_dir = resolve(train, options.signal_before)
    text = script(options, config_path, overrides, run_dir, [a for a in argv if a != "--submit"])
    if not options.submit:
        print(text, end="")
        return 0
    return submit(text)


def submit(text: str) -> int:
    """sbatch the script (from stdin) and print the job id; a missing or failing sbatch is one line."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UsageError("sbatch not found: run on a Slurm login node, or without --submit to print the script")
    proc = subprocess.run([sbatch, "--parsable"], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit code {proc.returncode}"]
        raise UsageError(f"sbatch refused the job: {lines[-1]}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted Slurm job {job_id}")
    return 0


# -- a submitted job: status, logs, cancel ------------------------------------------------------
JOB_COMMANDS = ("status", "logs", "cancel")
_GONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", ""}


def _run(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which(args[0])
    if tool is None:
        raise UsageError(f"{args[0]} not found: run on a Slurm login node")
    return subprocess.run([tool, *args[1:]], capture_output=True, text=True, timeout=60)


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job JOBID` as a dict; a job Slurm does not know is one line."""
    proc = _run("scontrol", "show", "job", job_id)
    if proc.returncode != 0 or "JobState=" not in proc.stdout:
        raise UsageError(f"Slurm job {job_id!r}: {(proc.stderr or proc.stdout).strip() or 'unknown job'}")
    return dict(part.split("=", 1) for part in proc.stdout.split() if "=" in part)


def run_dir_of(job_id: str, fields: dict[str, str]) -> str | None:
    """The RUN_DIR its batch script sets (a script dtrain slurm wrote), from the job's folder."""
    proc = _run("scontrol", "write", "batch_script", job_id, "-")
    for line in proc.stdout.splitlines():
        if line.startswith("RUN_DIR="):
            value = shlex.split(line[len("RUN_DIR="):])[0]
            return value if "://" in value or value.startswith("/") else os.path.join(fields.get("WorkDir", ""), value)
    return None


def last_committed(run_dir: str) -> int | None:
    from pathlib import Path

    from distributed_train.storage import StorageError, Store, is_url
    from distributed_train.training.checkpoints import commit, remote

    try:
        if is_url(run_dir):
            found = remote.committed(Store(run_dir))[0]
            return found[-1].step if found else None
        steps = commit.checkpoint_steps(Path(run_dir) / "checkpoints")
        return steps[-1][0] if steps else None
    except StorageError:
        return None


def job_command(command: str, argv: list[str]) -> int:
    """`dtrain slurm status|logs|cancel JOBID`."""
    follow = "--follow" in argv or "-f" in argv
    ids = [a for a in argv if not a.startswith("-")]
    if len(ids) != 1 or not ids[0].isdigit() or (follow and command != "logs"):
        raise UsageError(f"usage: dtrain slurm {command} JOBID" + (" [--follow]" if command == "logs" else ""))
    job_id, fields = ids[0], job_fields(ids[0])
    if command == "status":
        run_dir = run_dir_of(job_id, fields)
        step = last_committed(run_dir) if run_dir else None
        print(f"job {job_id} ({fields.get('JobName', '?')}): {fields.get('JobState')}, nodes "
              f"{fields.get('NodeList', '?')}, restarts {fields.get('Restarts', '0')}, run time "
              f"{fields.get('RunTime', '?')}; run_dir {run_dir or '?'}, last committed step "
              f"{'-' if step is None else step}")
        return 0
    if command == "logs":
        return _logs(job_id, fields.get("StdOut", ""), follow)
    return _cancel(job_id, fields)


def _logs(job_id: str, path: str, follow: bool) -> int:
    import time

    try:
        with open(path, errors="replace") as log:
            while True:
                sys.stdout.write(log.read())
                sys.stdout.flush()
                if not follow or job_fields(job_id).get("JobState") in _GONE:
                    if follow:
                        sys.stdout.write(log.read())
                    return 0
                time.sleep(1)
    except OSError as exc:
        raise UsageError(f"Slurm job {job_id}: cannot read its log {path!r}: {exc.strerror}") from None


def _cancel(job_id: str, fields: dict[str, str]) -> int:
    """Graceful: TERM to every node's steps (the agreed stop and a committed checkpoint), wait
    until they ended, then the normal cancel (which also removes the requeued job)."""
    import time

    if fields.get("JobState") == "RUNNING":
        _run("scancel", "--signal=TERM", job_id)
        deadline = time.monotonic() + 600
        while job_fields(job_id).get("JobState") in {"RUNNING", "COMPLETING"} and time.monotonic() < deadline:
            time.sleep(1)
    proc = _run("scancel", job_id)
    if proc.returncode != 0 and job_fields(job_id).get("JobState") not in _GONE:
        raise UsageError(f"scancel {job_id} failed: {(proc.stderr or proc.stdout).strip()}")
    run_dir = run_dir_of(job_id, fields)
    step = last_committed(run_dir) if run_dir else None
    print(f"cancelled Slurm job {job_id}" + (f"; its last committed checkpoint is step {step} in {run_dir}"
                                             if step is not None else ""))
    return 0
