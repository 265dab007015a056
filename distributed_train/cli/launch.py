"""`dtrain launch`: start local workers through torch.distributed.run, each running `dtrain train`.

Our arguments (CONFIG, --section.key=value) and torchrun's (--nproc-per-node, --max-restarts,
--rdzv-*, ...) share one command line; torchrun's option names decide which is which.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile

from distributed_train.errors import EXIT_USAGE, UsageError

# Restarts reuse the agent's rendezvous store unless this is set, and then fail or hang in
# init_process_group (pytorch/pytorch#135712; ../shared/PITFALLS.md).
RESTART_SAFE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# Every worker hashes strings alike (each Python process picks its own seed otherwise), so a set
# of strings iterates in the same order on every rank: a task's `list(set(text))` vocabulary too.
SAME_HASHES_ENV = {"PYTHONHASHSEED": "0"}


def torchrun_parser():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    if not any("--shutdown-timeout" in action.option_strings for action in parser._actions):
        # torch 2.11's torchrun has no such option: its agent SIGKILLs the workers 30 s after it
        # forwarded SIGTERM, too soon for a large stop checkpoint. `dtrain slurm` and `dtrain k8s`
        # write it; dtrain launch applies it (`_shutdown_timeout_for_older_torch`).
        parser.add_argument("--shutdown-timeout", "--shutdown_timeout", type=int, default=None,
                            dest="dtrain_shutdown_timeout",
                            help="seconds the workers get after a stop signal before SIGKILL (default 30, "
                                 "or TORCH_ELASTIC_SHUTDOWN_TIMEOUT)")
    return parser


def _older_torch_shutdown_timeout(parsed) -> int | None:
    """The --shutdown-timeout dtrain launch applies itself (torch 2.11), or None (torchrun does)."""
    if "dtrain_shutdown_timeout" not in vars(parsed):
        return None
    seconds = parsed.dtrain_shutdown_timeout
    if seconds is None and os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        value = os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]
        if not value.strip().isdigit():
            raise UsageError(f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number of seconds, got {value!r}")
        seconds = int(value)
    return seconds


@contextlib.contextmanager
def _shutdown_timeout_for_older_torch(parsed):
    """--shutdown-timeout where torchrun has none: its agent stops the workers through
    `PContext.close(sig)`, which waits 30 s by default; this process runs only that agent, so that
    default becomes the one asked for (a restart's stop gets it too; newer torch keeps 30 s there)."""
    seconds = _older_torch_shutdown_timeout(parsed)
    if seconds is None:
        yield
        return
    from torch.distributed.elastic.multiprocessing import api

    close = api.PContext.close

    def close_later(self, death_sig=None, timeout: int = seconds):
        return close(self, death_sig, timeout)

    api.PContext.close = close_later
    try:
        yield
    finally:
        api.PContext.close = close


def split_launch_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, `dtrain train` arguments) from one mixed command line."""
    from distributed_train.cli import split_options

    return split_options(torchrun_parser(), argv, never=("-h", "--help"))


def default_nproc() -> int:
    """The visible GPUs, else 2 CPU processes."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def options_from_environ(environ=None) -> set[str]:
    """torchrun options given as PET_* variables (torchrun reads PET_NNODES as --nnodes, ...), as a
    Kubeflow TrainJob's runtime sets them."""
    environ = os.environ if environ is None else environ
    return {"--" + key[4:].lower().replace("_", "-") for key, value in environ.items()
            if key.startswith("PET_") and value}


def build_torchrun_args(torchrun: list[str], train: list[str], environ=None) -> list[str]:
    """torchrun's argument list: ours plus defaults (nproc, standalone rendezvous), then the worker."""
    from distributed_train.distributed import slurm

    environ = os.environ if environ is None else environ
    given = {a.split("=", 1)[0].replace("_", "-") for a in torchrun if a.startswith("--")}
    given |= options_from_environ(environ)
    derived, said = slurm.launch_options(environ, given)  # an srun step: one agent per node
    if said:
        print(said, file=sys.stderr, flush=True)
    elif slurm.alone_in_a_multi_node_job(environ):
        print(f"dtrain launch: warning: Slurm job {environ['SLURM_JOB_ID']} has {environ['SLURM_NNODES']} nodes "
              "but this runs on one: start it with srun --ntasks-per-node=1 (dtrain slurm writes such a "
              "script)", file=sys.stderr, flush=True)
    given |= {a for a in derived if a.startswith("--")}
    args = list(torchrun) + derived
    if "--nproc-per-node" not in given:
        args += ["--nproc-per-node", str(default_nproc())]
    multi_node = given & {"--rdzv-endpoint", "--master-addr", "--nnodes", "--rdzv-backend"}
    if not multi_node and "--standalone" not in given:
        args.append("--standalone")  # a free port on localhost: no clash with other jobs
    return args + ["-m", "distributed_train", "train", *train]


def _validate_before_spawn(train: list[str]):
    """Check config and task in this process, fail fast; fix run_dir so restarts resume there.

    Returns the workers' arguments and the resolved config."""
    from distributed_train.cli.train import resolve_config, split_config_args
    from distributed_train.task import check_model_before_spawn
    from distributed_train.training.checkpoints.checkpointer import check_resume_before_start
    from distributed_train.training.trainer import default_run_dir

    config_path, overrides, _ = split_config_args(train)
    start_dir = os.getcwd()
    try:
        config = resolve_config(config_path, overrides)
        check_model_before_spawn(config.task, config)
    finally:  # task code that changed directory (on import, or building the task) moves no worker
        os.chdir(start_dir)
    check_resume_before_start(config)
    if config.run_dir is None:
        config.run_dir = default_run_dir(config.task)
        train = [*train, f"--run_dir={config.run_dir}"]
    return train, config


def _warn_restarts_without_checkpoints(parsed, config) -> None:
    """Restarted workers resume from the last checkpoint; with none they start over."""
    if int(parsed.max_restarts or 0) > 0 and not config.checkpoint.periodic:
        print("dtrain launch: warning: --max-restarts without checkpoint.every_steps: a restarted "
              "group starts again from step 0 (set --checkpoint.every_steps=N to resume instead)",
              file=sys.stderr)


NPROC_KEYWORDS = ("auto", "cpu", "gpu", "xpu")  # what torchrun accepts besides a number


def check_torchrun_options(parsed) -> None:
    """The torchrun options we know a bad value of: one line before anything starts."""
    nproc = str(parsed.nproc_per_node)
    if nproc not in NPROC_KEYWORDS and not (nproc.isdigit() and int(nproc) >= 1):
        raise UsageError(f"--nproc-per-node must be a whole number >= 1 or one of {', '.join(NPROC_KEYWORDS)}, "
                         f"got {nproc!r}")
    if int(parsed.max_restarts) < 0:
        raise UsageError(f"--max-restarts must be 0 or more, got {parsed.max_restarts}")
    shutdown = vars(parsed).get("shutdown_timeout", _older_torch_shutdown_timeout(parsed))
    if shutdown is not None and int(shutdown) < 0:
        raise UsageError(f"--shutdown-timeout must be 0 or more seconds, got {shutdown}")
    low, _, high = str(parsed.nnodes).partition(":")
    if not (low.isdigit() and int(low) >= 1 and (not high or (high.isdigit() and int(high) >= int(low)))):
        raise UsageError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {parsed.nnodes!r}")


def _check_batch_split(parsed, config) -> None:
    """With a fixed world size (nnodes x nproc), check the global batch splits evenly here,
    before spawning, rather than from every worker."""
    from distributed_train.batches import BatchPlan

    min_nodes, _, max_nodes = str(parsed.nnodes).partition(":")
    try:
        nproc = int(parsed.nproc_per_node)
    except ValueError:  # nproc "gpu"/"auto": the world size is not known yet
        return
    try:
        world_size = int(min_nodes) * nproc
    except ValueError:
        return
    if max_nodes and max_nodes != min_nodes:  # elastic "1:4": neither is it
        return
    BatchPlan.make(config.train.batch_size, world_size, config.train.micro_batch_size)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print("usage: dtrain launch [torchrun options] [CONFIG.yaml | TASK] [--section.key=value ...]\n\n"
              "Starts --nproc-per-node workers (default: the visible GPUs, else 2) with torchrun's\n"
              "standalone rendezvous; every torchrun option works (--max-restarts, --nnodes, --rdzv-*).\n"
              "Config keys: dtrain train --help.")
        return 0
    torchrun, train = split_launch_args(argv)
    from distributed_train.errors import user_errors

    with user_errors("--debug" in train):
        train, config = _validate_before_spawn(train)
        args = build_torchrun_args(torchrun, train)
        parsed = torchrun_parser().parse_args(args)
        check_torchrun_options(parsed)
        _check_batch_split(parsed, config)
        _warn_restarts_without_checkpoints(parsed, config)
    for key, value in {**RESTART_SAFE_ENV, **SAME_HASHES_ENV}.items():
        os.environ.setdefault(key, value)
    from distributed_train.cli.train import LAUNCHER_PID_VAR

    os.environ[LAUNCHER_PID_VAR] = str(os.getpid())  # workers die with this process (parent-death signal)
    from distributed_train.training.reporting.goodput import COMMAND_START_ENV, process_start

    os.environ[COMMAND_START_ENV] = f"{process_start():.3f}"  # goodput's start-up counts from the command
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would force 1 thread per worker
        from distributed_train.distributed import cpu_count

        os.environ["OMP_NUM_THREADS"] = str(max(1, cpu_count() // _nproc(parsed)))
    return run_torchrun(parsed, config.run_dir)


def _nproc(parsed) -> int:
    try:
        return max(1, int(parsed.nproc_per_node))
    except ValueError:  # "gpu", "auto", ...: let torchrun decide, one thread each
        return os.cpu_count() or 1


def describe_exit(exitcode: int) -> str:
    """How a worker ended, with advice that fits: a signal names itself, an exit code points above."""
    if exitcode >= 0:
        return f"exited with code {exitcode}; its error is above"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    advice = {
        "SIGKILL": "killed: out of memory (check `dmesg` for the OOM killer, or lower the batch size) or kill -9",
        "SIGSEGV": "a native crash (torch, a C extension or the driver); rerun with --debug and check versions",
        "SIGABRT": "aborted in native code: NCCL's watchdog after a collective timed out with "
                   "TORCH_NCCL_ASYNC_ERROR_HANDLING=1 or 3, or gloo at exit; see the message above it",
        "SIGBUS": "a bus error: often /dev/shm too small (docker --shm-size) or a file truncated under mmap",
    }.get(name, "ended by a signal")
    return f"died from {name} ({advice})"


def _recorded(failure) -> dict | None:
    """What a worker left in its torchrun error file with its one-line error (errors.record_failure)."""
    data = failure.error_file_data
    recorded = data.get("dtrain") if isinstance(data, dict) else None
    return recorded if isinstance(recorded, dict) else None


def _failure_order(failure) -> tuple[bool, float]:
    """Which worker failed first: one that failed because another left comes after every other
    (it may have noticed before that rank recorded its own failure), and so does one that SIGTERM
    ended without a word (torchrun's stop of the others once one failed); then the time it recorded
    with its explanation, else torchrun's (whole seconds)."""
    recorded = _recorded(failure)
    if recorded:
        return bool(recorded.get("after_peer")), recorded["time"]
    return failure.exitcode == -signal.SIGTERM, float(failure.timestamp)


def _failed_workers(exc, run_dir: str | None) -> int:
    """The launcher's exit code for workers that failed, after naming them where they did not."""
    from distributed_train.errors import EXIT_COMMUNICATION, EXIT_NONFINITE

    in_order = sorted(exc.failures.items(), key=lambda item: _failure_order(item[1]))
    codes = sorted({f.exitcode for f in exc.failures.values()})
    if EXIT_USAGE in codes:
        return EXIT_USAGE
    stops = {128 + signal.SIGTERM, 128 + signal.SIGHUP, 128 + signal.SIGINT}
    if set(codes) <= stops:  # a signal reached some workers: all stopped after the same step
        print(f"dtrain launch: workers stopped by a signal{_resume_hint(run_dir)}", file=sys.stderr)
        return max(codes)
    explained = [f.exitcode for _, f in in_order if f.exitcode in (EXIT_NONFINITE, EXIT_COMMUNICATION)]
    # The workers already said why; ranks killed by a signal (SIGKILLed after that, or a
    # stopped rank a peer ended) are part of the same failure.
    if explained and all(c in (EXIT_NONFINITE, EXIT_COMMUNICATION) or c < 0 for c in codes):
        return explained[0]
    # The first to fail is the cause; the others are usually torchrun's shutdown of the group.
    for i, (rank, failure) in enumerate(in_order):
        first = " (the first to fail)" if i == 0 and len(exc.failures) > 1 else ""
        print(f"dtrain launch: worker rank {rank} (pid {failure.pid}) {describe_exit(failure.exitcode)}{first}",
              file=sys.stderr)
    return 1


def _recap_first_failure(failures: dict) -> None:
    """The explanation of the worker that failed first as the launcher's last line, when several
    failed (the others usually only report that it left: they waited for it) or when that worker
    did not print it (a usage error found on a rank other than 0)."""
    explained = sorted((_failure_order(f), rank, f.message, _recorded(f).get("printed", True))
                       for rank, f in failures.items() if _recorded(f))
    if explained and (len(failures) > 1 or not explained[0][3]):
        _, rank, message, _ = explained[0]
        print(f"dtrain launch: rank {rank} failed first: {message}", file=sys.stderr, flush=True)


class _WorkerFailedLine(logging.Filter):
    """Drops torchrun's `E... failed (exitcode: 2) local_rank: 0 (pid ...) of binary ...` line: the
    failed worker said why in its own line, and the launcher names the failure itself below, so
    that the last line of a failed job is an explanation, not torchrun's exit-code report."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("failed (exitcode")


@contextlib.contextmanager
def _error_files_dir(parsed):
    """Without --log-dir torchrun makes a torchelastic_* folder in the temporary directory for its
    workers' error files and leaves it there: one per launch, for ever. The launcher gives it one
    that goes when the launch ends (the failures it reports were read from it by then), unless
    the workers' output goes there too (--redirects, --tee): then it is torchrun's, and stays."""
    if parsed.log_dir is not None or str(parsed.redirects) != "0" or str(parsed.tee) != "0":
        yield
        return
    with tempfile.TemporaryDirectory(prefix="dtrain-launch-", ignore_cleanup_errors=True) as folder:
        parsed.log_dir = folder
        try:
            yield
        finally:
            parsed.log_dir = None


def run_torchrun(parsed, run_dir: str | None = None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import run

    from distributed_train.distributed.diagnose import describe
    from distributed_train.errors import EXIT_COMMUNICATION

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_WorkerFailedLine())
    try:
        with _shutdown_timeout_for_older_torch(parsed), _error_files_dir(parsed):
            run(parsed)
    except SignalException as exc:
        # torchrun forwarded the signal; every worker stops after the same step and rank 0 commits.
        print(f"dtrain launch: stopped by {exc.sigval.name}{_resume_hint(run_dir)}", file=sys.stderr)
        return 128 + int(exc.sigval)
    except (RendezvousError, DistError) as exc:
        where = parsed.rdzv_endpoint or f"{parsed.master_addr}:{parsed.master_port}"
        print(f"dtrain: error: could not join the rendezvous at {where} ({describe(exc)}): "
              "check --rdzv-endpoint, that the other --nnodes started, and the "
              "network; raise --rdzv-conf join_timeout=SECONDS to wait longer", file=sys.stderr)
        return EXIT_COMMUNICATION
    except ChildFailedError as exc:
        code = _failed_workers(exc, run_dir)
        _recap_first_failure(exc.failures)
        return code
    return 0


def _resume_hint(run_dir: str | None) -> str:
    """'; rerun ... to continue' when a committed checkpoint exists to resume from."""
    from pathlib import Path

    from distributed_train.storage import StorageError, Store, is_url
    from distributed_train.training.checkpoints import remote
    from distributed_train.training.checkpoints.commit import committed_checkpoints

    try:
        found = remote.committed(Store(run_dir))[0] if is_url(run_dir) else \
            run_dir and committed_checkpoints(Path(run_dir) / "checkpoints")
    except StorageError:
        found = False
    if found:
        return "; rerun the same command to continue from the last committed checkpoint"
    return " (no checkpoint to resume from)"
