"""The bad-input matrix (docs/robustness.md): each mistake exits with its documented code
and one `dtrain: error:` line naming the cause and the fix; no traceback unless --debug."""

import inspect
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, clean_env, dtrain, free_port, run_cmd, temp_leftovers

pytestmark = pytest.mark.slow

BAD = "--task=tests/tasks/broken_tasks.py:"
SMALL = ["--train.batch_size=8", "--train.max_steps=4", "--log.wandb=disabled"]


def _error_lines(proc, code: int) -> list[str]:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr}"
    return [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]


def _one_error_line(proc, code: int) -> str:
    lines = _error_lines(proc, code)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_dataset_of_objects_the_collate_cannot_batch(tmp_path):
    args = ["train", BAD + "NonTensorSamples", *SMALL, f"--run_dir={tmp_path}"]
    line = _one_error_line(dtrain(*args, check=False), 2)
    assert "a training batch cannot be built: default_collate" in line and "collate(samples)" in line
    debug = dtrain(*args, "--debug", check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug keeps the traceback


def test_dataset_that_cannot_be_pickled_into_workers(tmp_path):
    # Workers start from a forkserver by default and receive the dataset pickled: an open file
    # cannot travel. One line naming the key; the fix it names (fork) trains.
    args = ["train", BAD + "OpenFileDataset", *SMALL, "--data.num_workers=1"]
    proc = dtrain(*args, f"--run_dir={tmp_path / 'forkserver'}", check=False)
    line = _one_error_line(proc, 2)
    assert "task.train_dataset() or task.collate cannot be sent to DataLoader workers started by forkserver" \
        in line and "cannot pickle '_io.BufferedReader' object" in line, line
    assert "data.worker_start_method=fork" in line and "Got pickle error" not in proc.stderr, line
    dtrain(*args, "--data.worker_start_method=fork", f"--run_dir={tmp_path / 'fork'}")
    assert (tmp_path / "fork" / "summary.json").exists()


def test_dataset_bigger_than_the_shared_memory_for_workers(tmp_path):
    # A container's /dev/shm is 64 MB unless sized (Docker's default): the dataset's tensors move
    # there when workers start from the forkserver. Here /dev/shm is 8 MB in a mount namespace of
    # the job's own (root only; the machine's /dev/shm is not touched).
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (root) for a private /dev/shm")
    small_shm = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec "$@"', "sh",
                 sys.executable, "-m", "distributed_train", "train", BAD + "SixteenMegabytesOfTensors", *SMALL,
                 "--data.num_workers=1"]
    proc = run_cmd([*small_shm, f"--run_dir={tmp_path / 'forkserver'}"], cwd=REPO, check=False)
    line = _one_error_line(proc, 2)
    assert "cannot be sent to DataLoader workers started by forkserver" in line and \
        "its tensors move into shared memory when workers start: /dev/shm has 8 MiB free" in line, line
    run_cmd([*small_shm, "--data.worker_start_method=fork", f"--run_dir={tmp_path / 'fork'}"], cwd=REPO)
    assert (tmp_path / "fork" / "summary.json").exists()


def test_shape_error_in_the_first_step(tmp_path):
    line = _one_error_line(dtrain("train", BAD + "ShapeMismatch", *SMALL, f"--run_dir={tmp_path}",
                                  check=False), 2)
    # The evaluation methods run on one eval batch before training, so metrics() meets it first.
    assert "task.metrics() failed on the first eval batch with RuntimeError: mat1 and mat2 shapes" in line


def test_nonfinite_loss_stops_with_exit_code_3(tmp_path):
    proc = dtrain("train", BAD + "NaNLoss", "--task_args.rank=0", "--task_args.step=2", *SMALL,
                  f"--run_dir={tmp_path}", check=False)
    line = _one_error_line(proc, 3)
    assert "non-finite loss (NaN or inf) at step 2 on rank 0" in line and "train.nonfinite=skip" in line


def test_model_with_parameters_unused_in_forward(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = dtrain("launch", "--nproc-per-node", "2", BAD + "UnusedParameter", *SMALL, f"--run_dir={tmp_path / 'run'}",
                  check=False, env=clean_env(TMPDIR=str(scratch)))
    line = _one_error_line(proc, 2)
    assert "(unused.weight, unused.bias)" in line and "--ddp.find_unused_parameters=true" in line
    # The workers' error files (what that line was read from) went with the launch.
    assert not temp_leftovers(scratch)


def _unused_line(proc) -> str:
    """The launcher's last line for an unused parameter, between its fixed start and end (exit 2)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    start = "dtrain launch: rank 1 failed first: the model has parameters that got no gradient "
    end = ("; DDP needs --ddp.find_unused_parameters=true for that (it costs a graph walk per step), or remove "
           "those parameters from the model or freeze them (requires_grad=False)")
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(start) and last.endswith(end), proc.stderr
    return last[len(start):-len(end)]


@pytest.mark.parametrize("shm", ["auto", "never"])  # our shared-memory all-reduce, and gloo's
def test_a_parameter_unused_on_one_rank_at_a_later_step_is_named_at_once(tmp_path, shm):
    """A conditional branch skipped on rank 1 at step 3 only: the first-step check cannot see it;
    rank 1 finds it right after its backward, before any collective, and the launcher ends with
    its line (rank 0, waiting for rank 1's gradients, only reports that rank 1 left)."""
    trace = tmp_path / "loss-calls"
    proc = dtrain("launch", "--nproc-per-node", "2", BAD + "ConditionalBranch", "--task_args.step=3",
                  "--task_args.rank=1", f"--task_args.trace={trace}", f"--ddp.shm_allreduce={shm}",
                  "--dist.timeout_s=120", *SMALL, f"--run_dir={tmp_path / 'run'}", check=False, timeout=150)
    assert _unused_line(proc) == "in step 3 on rank 1 (extra.weight, extra.bias)", proc.stderr
    assert "timed out" not in proc.stderr, proc.stderr  # found at once, not after dist.timeout_s
    # Step 3 was rank 1's last: found after its backward, not by DDP at step 4's forward after a
    # mismatched collective (under gloo that aborts rank 0; under NCCL it may hang).
    assert max(int(line.split()[1]) for line in trace.read_text().splitlines() if line.startswith("1 ")) == 3
    # and with find_unused_parameters the same model trains to the end
    dtrain("launch", "--nproc-per-node", "2", BAD + "ConditionalBranch", "--ddp.find_unused_parameters=true",
           f"--ddp.shm_allreduce={shm}", *SMALL, f"--run_dir={tmp_path}/ok", timeout=150)


def test_a_parameter_unused_only_in_the_last_micro_batch_is_named(tmp_path):
    """With accumulation a parameter used in an earlier micro-batch has a gradient, so the check
    after the backward passes; DDP reduces the last micro-batch only and fails at the next step's
    forward. That failure names the parameters and the micro-batch, not just DDP's indices."""
    # 2 micro-batches per rank and step: loss() call 4 is step 2's last one.
    proc = dtrain("launch", "--nproc-per-node", "2", BAD + "ConditionalBranch", "--task_args.step=4",
                  "--task_args.rank=1", "--train.batch_size=8", "--train.micro_batch_size=2",
                  "--train.max_steps=6", "--eval.every_steps=0", "--dist.timeout_s=120",
                  f"--run_dir={tmp_path}", check=False, timeout=150)
    assert _unused_line(proc) == ("in the last micro-batch of step 2 (the one DDP reduces) on rank 1 "
                                  "(extra.weight, extra.bias)"), proc.stderr


def test_rank_not_below_world_size(tmp_path):
    env = clean_env(RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    line = _one_error_line(dtrain("train", *SMALL, f"--run_dir={tmp_path}", env=env, check=False), 2)
    assert "RANK=2 must be smaller than WORLD_SIZE=2" in line


def test_unreachable_master_fails_within_the_timeout(tmp_path):
    port = free_port()  # nobody listens there
    env = clean_env(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    proc = dtrain("train", *SMALL, "--dist.timeout_s=2", f"--run_dir={tmp_path}", env=env, check=False)
    line = _one_error_line(proc, 4)
    assert f"rank 1 of 2 could not join the process group at 127.0.0.1:{port} within dist.timeout_s=2" in line


def test_unreachable_rendezvous_in_launch(tmp_path):
    port = free_port()
    proc = dtrain("launch", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", "join_timeout=3", *SMALL,
                  f"--run_dir={tmp_path}", check=False)
    line = _one_error_line(proc, 4)
    assert f"could not join the rendezvous at 127.0.0.1:{port}" in line and "join_timeout" in line


def test_hung_rank_is_named_and_the_job_ends_long_before_it_wakes(tmp_path):
    # Rank 1's loss sleeps 120 s at step 3; with dist.timeout_s=4 rank 0's gradient all-reduce
    # times out and names rank 1, and rank 1 (SIGTERMed by torchrun) ends itself soon after.
    from torch.distributed.elastic.multiprocessing.api import PContext

    # When a worker fails, torchrun SIGTERMs the others and SIGKILLs them this long after: the
    # fallback the stuck rank's own watchdog (dist.timeout_s + 2 s) must beat.
    torchrun_sigkill_after_s = inspect.signature(PContext.close).parameters["timeout"].default
    assert torchrun_sigkill_after_s == 30
    proc = dtrain("launch", "--nproc-per-node", "2", BAD + "SleepyLoss", "--task_args.sleep_s=120",
                  "--dist.timeout_s=4", *SMALL, f"--run_dir={tmp_path}", check=False, timeout=150)
    lines = _error_lines(proc, 4)
    assert "Traceback" not in proc.stderr, proc.stderr
    # Rank 1 is "stuck" once its phase outlasts dist.timeout_s; on a busy machine rank 0 may time
    # out a moment before that, and then says where rank 1 is instead.
    assert any("rank 0: backward (DDP gradient all-reduce) of step 3 timed out after dist.timeout_s=4 s" in line
               and ("rank 1 is stuck: its main thread has been in task.loss() of step 3" in line
                    or "rank 1 did not arrive: it is in task.loss() of step 3" in line) for line in lines), \
        proc.stderr
    # The stuck rank's own line: it waited its grace (4 + 2 s) after SIGTERM, then ended itself.
    ended = [re.fullmatch(r"dtrain: error: rank 1: stopped by SIGTERM but stuck in task\.loss\(\) of step 3 "
                          r"for (\d+) s \(> dist\.timeout_s\); exiting without a checkpoint", line) for line in lines]
    stuck_s = [int(m.group(1)) for m in ended if m]
    assert len(stuck_s) == 1 and 6 <= stuck_s[0], proc.stderr
    # torchrun's side: it sent SIGTERM and never needed its SIGKILL fallback.
    assert re.search(r"Sending process \d+ closing signal SIGTERM", proc.stderr), proc.stderr
    assert "forcefully exiting via" not in proc.stderr, proc.stderr
    # No wall-clock bound (load can stretch any): that the stuck rank ended itself (its line above)
    # and torchrun never SIGKILLed is what shows the job did not wait out the 120 s sleep.


def test_a_rank_that_raises_takes_the_job_down_promptly(tmp_path):
    proc = dtrain("launch", "--nproc-per-node", "2", BAD + "RaisingLoss", "--dist.timeout_s=120", *SMALL,
                  f"--run_dir={tmp_path}", check=False, timeout=150)
    assert proc.returncode == 1, proc.stderr
    assert "RuntimeError: simulated crash" in proc.stderr  # an unknown error keeps its traceback
    # "left the job", not "timed out after dist.timeout_s=120": the peer noticed the departure
    assert "rank 1 left the job in task.loss() of step 3" in proc.stderr, proc.stderr
    assert "timed out after dist.timeout_s=120" not in proc.stderr, proc.stderr


# ---- every value checked: one line, exit 2, before any worker starts (docs/faults.md) ----------

FAULTS = "--task=tests/tasks/fault_tasks.py:"
CONFIG_FILES = {
    "duplicate key": ("train:\n  lr: 0.1\n  batch_size: 8\n  lr: 0.2\n", "key 'lr' appears twice (lines 2 and 4)"),
    "tab": ("train:\n\tlr: 0.1\n", "is not valid YAML at line 2, column 1: found character '\\t'"),
    "not utf-8": (b"task: digits\nrun_dir: caf\xe9\n", "is not UTF-8 text (line 2 has the byte 0xe9)"),
    "directory": (None, "is a directory; pass a YAML file"),
}
ONE_LINERS = {
    "nan lr": (["--train.lr=nan"], "train.lr must be a finite number, got nan"),
    "inf lr": (["--train.lr=inf"], "train.lr must be a finite number, got inf"),
    "nan timeout": (["--dist.timeout_s=nan"], "dist.timeout_s must be a finite number"),
    "seed too large": (["--seed=18446744073709551616"], "seed must be an integer from 0 to 4294967295"),
    "no parameters": ([FAULTS + "NoParameters"], "task.model() returned a model without trainable parameters"),
    "task_args not YAML": (["--task_args.files=[0-9]*.txt"],
                           "--task_args.files=[0-9]*.txt is not a YAML value (expected alphabetic or numeric"),
    "task_args at sign": (["--task_args.data=@corpus"], "--task_args.data=@corpus is not a YAML value"),
    "task_args mapping": (["--task_args.x=a: b: c"], "quote a string in YAML: --task_args.x=\"'a: b: c'\""),
    "task_args key twice": (["--task_args.x={a: 1, a: 2}"], "--task_args.x={a: 1, a: 2}: key 'a' appears twice"),
    "negative __len__": ([BAD + "NegativeLength"], "task.train_dataset()'s dataset cannot tell its length: "
                                                    "__len__ raised ValueError: __len__() should return >= 0"),
    "raising __len__": ([BAD + "RaisingLength"], "__len__ raised OSError: the index file is gone"),
    "worker start method": (["--data.worker_start_method=thread"],
                            "data.worker_start_method must be one of default, fork, forkserver, spawn; got 'thread'"),
}
# Runs `dtrain ARGS` once per case in ONE fresh process (one `import torch` for all of them):
# the same entry point as the console script, each case's stderr captured on its own.
DRIVER = """
import contextlib, io, json, sys
from distributed_train import cli
results = {}
for name, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except SystemExit as exc:
            code = exc.code
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def test_every_bad_value_is_one_line_and_exit_2(tmp_path):
    import json

    cases, needles = {}, {}
    for name, (text, needle) in CONFIG_FILES.items():
        path = tmp_path / name.replace(" ", "_")
        path.mkdir() if text is None else path.write_bytes(text if isinstance(text, bytes) else text.encode())
        cases[name], needles[name] = [str(path)], needle
    for name, (args, needle) in ONE_LINERS.items():
        cases[name], needles[name] = args, needle
    cases = {name: ["train", *args, *SMALL, f"--run_dir={tmp_path}/run"] for name, args in cases.items()}
    proc = run_cmd([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=REPO, timeout=120)
    for name, (code, stderr) in json.loads(proc.stdout.splitlines()[-1]).items():
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, (name, stderr)
        assert lines[0].startswith("dtrain: error: ") and needles[name] in lines[0], (name, lines[0])
    assert not (tmp_path / "run").exists()  # nothing started: not even the run directory


@pytest.mark.parametrize("args, needle", [
    (["--nproc-per-node=0"], "--nproc-per-node must be a whole number >= 1 or one of auto, cpu, gpu, xpu, got '0'"),
    (["--nproc-per-node=abc"], "--nproc-per-node must be a whole number >= 1 or one of auto, cpu, gpu, xpu"),
    (["--max-restarts=-1"], "--max-restarts must be 0 or more, got -1"),
    (["--nnodes=0"], "--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got '0'"),
    (["--nnodes=2:1"], "--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got '2:1'"),
    (["--nproc-per-node=2", FAULTS + "FrozenModel"], "task.model() returned a model without trainable parameters"),
])
def test_launch_refuses_before_spawning(tmp_path, args, needle):
    proc = dtrain("launch", *args, *SMALL, f"--run_dir={tmp_path}/run", cwd=REPO, check=False, timeout=120)
    assert needle in _one_error_line(proc, 2)
    assert "torch.distributed.elastic" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, needle", [
    ([], "task.train_dataset() has 96 samples on rank 0 but 88 samples on rank 1; every rank must build "
         "the same dataset (give every node the whole data)"),
    (["--task_args.eval_only=true", "--task_args.rank=0"],
     "task.eval_dataset() has none on rank 0 but 50 samples on rank 1"),
])
def test_a_rank_with_a_partial_copy_of_the_data_stops_every_rank_before_the_first_step(tmp_path, args, needle):
    """It would train on other samples than one process, silently, then wait at its shorter
    epoch's end in a collective the others never join (a timeout blamed on a slow rank)."""
    run_dir = tmp_path / "run"
    proc = dtrain("launch", "--nproc-per-node", "2", BAD + "PartialCopy", *args, *SMALL,
                  "--checkpoint.every_steps=1", f"--run_dir={run_dir}", check=False, timeout=150)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.match(rf"dtrain launch: rank \d failed first: {re.escape(needle)}", last), proc.stderr
    assert all(needle in line for line in _error_lines(proc, 2)), proc.stderr
    assert "step 1" not in proc.stdout + proc.stderr and not (run_dir / "checkpoints").exists()
