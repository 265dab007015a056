"""Faults survived (docs/faults.md): what is injected, what the user sees, what is kept.

Each test runs the real `dtrain` command; world size 1 where the fault does not need peers."""

import json
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, clean_env, dtrain, run_cmd

pytestmark = pytest.mark.slow

FAULTS = "--task=tests/tasks/fault_tasks.py:"
SMALL = ["--train.batch_size=8", "--log.wandb=disabled", "--log.every_steps=1"]


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]


def _events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["kind"] == kind]


def test_a_per_sample_metric_stops_before_training(tmp_path):
    run = tmp_path / "run"
    proc = dtrain("train", FAULTS + "PerSampleMetric", *SMALL, "--train.max_steps=50", "--checkpoint.every_steps=1",
                  f"--run_dir={run}", cwd=REPO, check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert _errors(proc) == ["dtrain: error: task.metrics()['mse'] must be (sum, count) of numbers or one-element "
                             "tensors; its sum is a tensor of shape (8,) (sum it over the batch)"]
    assert _events(run, "train") == [] and not (run / "checkpoints").exists()  # not one step trained


def test_a_late_failure_keeps_the_model_and_a_zero_count_metric_is_reported(tmp_path):
    run = tmp_path / "late"
    proc = dtrain("train", FAULTS + "FinalEvalFails", *SMALL, "--train.max_steps=3", f"--run_dir={run}",
                  cwd=REPO, check=False, timeout=120)
    assert proc.returncode == 1 and "simulated failure in the final evaluation" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("RuntimeError: simulated failure")
    assert summary["global_step"] == 3 and (run / "final_model.pt").stat().st_size > 0
    import torch

    assert set(torch.load(run / "final_model.pt", weights_only=True)) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    run = tmp_path / "zero"
    proc = dtrain("train", FAULTS + "ZeroCountMetric", *SMALL, "--train.max_steps=2", f"--run_dir={run}",
                  cwd=REPO, timeout=120)
    assert "eval metric(s) never counted no samples (count 0): reported as null" in proc.stderr
    assert _events(run, "eval")[-1]["never"] is None
    assert json.loads((run / "summary.json").read_text())["eval"]["never"] is None


def test_a_second_job_on_the_same_run_dir_exits_2_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "distributed_train", "train", FAULTS + "SlowSteps", *SMALL,
            "--train.max_steps=400", f"--run_dir={run}"]
    first = subprocess.Popen(args, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:  # it holds the lock by then
            time.sleep(0.2)
        proc = dtrain("train", FAULTS + "SlowSteps", *SMALL, "--train.max_steps=4", f"--run_dir={run}",
                      cwd=REPO, check=False, timeout=120)
        assert first.poll() is None, first.stderr.read()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errors = _errors(proc)
        assert len(errors) == 1 and f"run_dir '{run}' is in use by another job (pid {first.pid} on " in errors[0]
        assert ", started 20" in errors[0] and "give this job another run_dir" in errors[0]
        assert len(_events(run, "start")) == 1  # the second job wrote nothing into metrics.jsonl
    finally:
        first.kill()  # its lock goes with it (tests/unit/test_fault_reporting.py: a stale lock never blocks)
        first.wait()


def test_resume_applies_a_changed_lr_and_ignores_foreign_checkpoint_folders(tmp_path):
    run = tmp_path / "run"
    base = ["train", "--task=tests/tasks/toy.py:Regression", *SMALL, "--checkpoint.every_steps=2",
            "--checkpoint.keep_last=1", f"--run_dir={run}"]
    dtrain(*base, "--train.max_steps=4", cwd=REPO, timeout=120)
    checkpoints = run / "checkpoints"
    (checkpoints / "step-99999999").mkdir()  # a name that looks newer, written by someone else
    (checkpoints / "step-99999999" / "state.pt").write_bytes(b"not ours")
    (checkpoints / "my-backup").mkdir()
    proc = dtrain(*base, "--train.max_steps=6", "--train.lr=0.01", cwd=REPO, timeout=120)
    assert f"resuming from {checkpoints / 'step-00000004'}" in proc.stderr
    ignored = [line for line in proc.stderr.splitlines() if "ignoring" in line]
    assert len(ignored) == 1 and "my-backup" in ignored[0] and "step-99999999" in ignored[0]
    assert "resuming with changed settings (applied from step 4 on): train.lr: 0.001 -> 0.01; " \
           "train.max_steps: 4 -> 6" in proc.stderr
    start = _events(run, "start")[-1]
    assert start["step"] == 4 and start["changed"] == ["train.lr: 0.001 -> 0.01", "train.max_steps: 4 -> 6"]
    assert [e["lr"] for e in _events(run, "train") if e["step"] > 4] == [0.01, 0.01]  # not the old 0.001
    # Rotation (keep_last=1) deleted step 4 for step 6 and left the foreign entries alone.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["my-backup", "step-00000006", "step-99999999"]


FULL_DISK = """
import errno, sys
from distributed_train import cli
from distributed_train.training.checkpoints import shards
real_write = shards.write_train_state
def write(directory, train_state):  # the disk fills up while checkpoint 4 is written
    if train_state["progress"]["global_step"] == 4:
        (directory / "train_state.pt").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(directory, train_state)
shards.write_train_state = write
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    proc = run_cmd([sys.executable, "-c", FULL_DISK, "train", "--task=tests/tasks/toy.py:Regression", *SMALL,
                    "--train.max_steps=8", "--checkpoint.every_steps=2", f"--run_dir={run}"],
                   cwd=REPO, check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert _errors(proc) == [f"dtrain: error: writing checkpoint {run / 'checkpoints' / 'step-00000004'} failed: "
                             "no space left on device; nothing of it was kept and the previous committed "
                             "checkpoint is intact"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # no .tmp-* left
    # Stopped at the write that failed (seen at the next step boundary, or the next save at the latest).
    assert max(e["step"] for e in _events(run, "train")) <= 6


def test_a_disk_that_refuses_every_ranks_shard_is_one_line_and_keeps_nothing_of_the_checkpoint(tmp_path):
    """A real refusal inside DCP's writes on both ranks (a 64 KiB file-size limit: EFBIG, as a full
    disk's ENOSPC), which DCP reports in its CheckpointException (a BaseException) and torch.save in a
    RuntimeError ("unexpected pos ..."): the OS's reason in one line, no .tmp-* folder left."""
    run = tmp_path / "run"
    limited = "trap '' XFSZ; ulimit -f 64; exec \"$0\" \"$@\""  # a write past 64 KiB fails with EFBIG
    proc = run_cmd(["bash", "-c", limited, sys.executable, "-m", "distributed_train", "launch", "--nproc-per-node",
                    "2", FAULTS + "WideModel", *SMALL, "--ddp.shm_allreduce=never", "--train.max_steps=8",
                    "--checkpoint.every_steps=4", f"--run_dir={run}"], cwd=REPO, check=False, timeout=180)
    line = (f"writing checkpoint {run / 'checkpoints' / 'step-00000004'} failed: file too large; nothing of it "
            "was kept and the previous committed checkpoint is intact")
    # Each rank sees the failed write at a step boundary after it, and which one first is a race: a
    # rank that saw it says it (rank 1 leaves it to the launcher), a rank already waiting for that one
    # in the next all-reduce names it, and torchrun's SIGTERM may end one first. The launcher's last
    # line says it in every case.
    assert proc.returncode == 1, proc.stderr
    first = re.fullmatch(rf"dtrain launch: rank (\d) failed first: {re.escape(line)}", proc.stderr.splitlines()[-1])
    # Both ranks failed alike; the one the launcher lists as the first to fail is the one it quotes.
    assert first and re.search(rf"^dtrain launch: worker rank {first[1]} .*\(the first to fail\)$", proc.stderr,
                               re.M), proc.stderr
    assert "Traceback" not in proc.stderr and "CheckpointException" not in proc.stderr, proc.stderr
    assert list((run / "checkpoints").iterdir()) == []


def test_runs_and_plot_survive_a_damaged_and_a_one_step_run(tmp_path):
    from tests.unit.test_plot_runs import write_run

    one = write_run(tmp_path / "runs" / "one-step", steps=1, total=1, eval_every=1)
    damaged = write_run(tmp_path / "runs" / "damaged", steps=3, total=3)
    with open(damaged / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "step": 4, "loss": \xff\xfe}\n')  # one bad byte: that line is dropped
    unreadable = write_run(tmp_path / "runs" / "unreadable", steps=3, total=3)
    (unreadable / "summary.json").write_text('{"global_step": "x"}')
    odd = write_run(tmp_path / "runs" / "odd", steps=3, total=3)
    (odd / "summary.json").write_text('{"global_step": 3, "eval": 5}')  # a shape only its row finds odd
    proc = dtrain("runs", str(tmp_path / "runs"), cwd=REPO, timeout=120)
    assert "one-step" in proc.stdout and "damaged" in proc.stdout and "unreadable" not in proc.stdout
    assert "odd" not in proc.stdout
    assert f"dtrain runs: skipping {unreadable}: cannot read it" in proc.stderr
    assert f"dtrain runs: skipping {odd}: cannot read it" in proc.stderr
    pytest.importorskip("matplotlib")
    dtrain("plot", str(one), "-o", str(tmp_path / "one.png"), cwd=REPO, timeout=120)
    assert (tmp_path / "one.png").stat().st_size > 10_000


def test_a_run_dir_deleted_under_a_running_job_stops_it_in_one_line(tmp_path):
    run = tmp_path / "run"
    proc = dtrain("launch", "--nproc-per-node", "2", FAULTS + "DeletesItsRunDir", *SMALL, "--train.max_steps=6",
                  "--checkpoint.every_steps=4", f"--run_dir={run}", cwd=REPO, check=False, timeout=150)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"run_dir '{run}' was deleted or replaced while this job ran" in lines[0]
    assert not (run / "final_model.pt").exists() and not (run / "summary.json").exists()


def test_sys_exit_in_task_code_is_a_task_error_not_a_finished_job(tmp_path):
    proc = dtrain("launch", "--nproc-per-node", "2", FAULTS + "ExitsInModel", *SMALL, "--train.max_steps=2",
                  f"--run_dir={tmp_path}/run", cwd=REPO, check=False, timeout=150)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert lines == ["dtrain: error: task.model() called sys.exit(0); task code must return or raise, "
                     "not end the process"], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == lines[0], proc.stderr  # the last line: ours, not torchrun's
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("what, where, code, message", [
    ("KeyboardInterrupt", "model", 2, "task.model() raised KeyboardInterrupt without a Ctrl-C (SIGINT); task code "
                                      "must return or raise an Exception"),
    ("KeyboardInterrupt", "loss", 2, "task.loss() at step 3 raised KeyboardInterrupt without a Ctrl-C (SIGINT); "
                                     "task code must return or raise an Exception"),
    ("SystemExit", "loss", 2, "task.loss() at step 3 called sys.exit(0); task code must return or raise, not end "
                              "the process"),
    ("kill:SIGTERM", "loss", 2, "task.loss() at step 3 raised SignalToItself: os.kill() would send SIGTERM to "
                                "its own process (not sent); a task cannot stop the job with a signal, which "
                                "would commit and exit as if a scheduler had stopped it: raise an exception to "
                                "fail it"),
    ("killpg:SIGINT", "loss", 2, "task.loss() at step 3 raised SignalToItself: os.killpg() would send SIGINT"),
    ("raise_signal:SIGHUP", "model", 2, "task.model() raised SignalToItself: signal.raise_signal() would send "
                                        "SIGHUP"),
    ("pthread_kill:SIGTERM", "loss", 2, "task.loss() at step 3 raised SignalToItself: signal.pthread_kill() "
                                        "would send SIGTERM"),
    ("MemoryError", "loss", 1, "out of memory in task.loss() at step 1 (MemoryError); lower "
                               "train.batch_size or set train.micro_batch_size, or give each rank more memory "
                               "(dtrain estimate TASK sizes a run)"),
])
def test_task_code_raising_a_base_exception_or_running_out_of_memory_is_named(tmp_path, what, where, code, message):
    """Never exit 0 (sys.exit) or 130 (a stop by Ctrl-C) for what task code raised; out of memory is
    exit 1, which a scheduler's retry policy may retry, not 2 ("fix the task")."""
    step = 1 if what == "MemoryError" else 3
    proc = dtrain("train", FAULTS + "Raises", f"--task_args.what={what}", f"--task_args.where={where}",
                  f"--task_args.step={step}", *SMALL, "--train.max_steps=4", f"--run_dir={tmp_path}/run",
                  cwd=REPO, check=False, timeout=120)
    errors = _errors(proc)  # the signal cases after the first give the start of the line
    assert proc.returncode == code and len(errors) == 1 and errors[0].startswith(f"dtrain: error: {message}"), \
        proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("what, where, needle", [
    ("kill:SIGTERM", "loss", "task.loss() at step 3 raised SignalToItself: os.kill() would send SIGTERM"),
    ("raise_signal:SIGTERM", "model", "task.model() raised SignalToItself: signal.raise_signal() would send "
                                      "SIGTERM"),
])
def test_a_stop_signal_task_code_sends_itself_fails_the_job_under_the_launcher(tmp_path, what, where, needle):
    """Not a stop: no checkpoint committed for it, no exit 143 (a retry policy would retry it forever);
    model() also runs in the launcher's own check, which the signal must not stop either."""
    proc = dtrain("launch", "--nproc-per-node", "2", FAULTS + "Raises", f"--task_args.what={what}",
                  f"--task_args.where={where}", "--task_args.step=3", *SMALL, "--train.max_steps=6",
                  "--checkpoint.every_steps=100", f"--run_dir={tmp_path}/run", cwd=REPO, check=False, timeout=150)
    # Both ranks fail alike; rank 0 says it unless torchrun's SIGTERM ended it after rank 1 failed first:
    # the launcher's last line says it in either case.
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 2 and re.match(rf"dtrain launch: rank \d failed first: {re.escape(needle)}", last), \
        proc.stderr
    assert all(error.startswith(f"dtrain: error: {needle}") for error in _errors(proc)), proc.stderr
    assert "stopped by" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_what_a_task_prints_names_the_rank_beyond_rank_0(tmp_path):
    proc = dtrain("launch", "--nproc-per-node", "2", FAULTS + "Prints", *SMALL, "--train.max_steps=2",
                  f"--run_dir={tmp_path}/run", cwd=REPO, timeout=150)
    out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
    assert out.count("building the model") == 1 and out.count("[rank 1] building the model") == 1, proc.stdout
    assert err.count("a note on stderr") == 1 and err.count("[rank 1] a note on stderr") == 1, proc.stderr
    assert out[-1].startswith("done: 2 steps"), proc.stdout  # dtrain's own lines are as they were


def test_a_task_that_changes_directory_cannot_move_the_run_folder(tmp_path):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    proc = dtrain("launch", "--nproc-per-node", "2", f"--task={REPO}/tests/tasks/fault_tasks.py:ChangesDirectory",
                  f"--task_args.to={elsewhere}", *SMALL, "--train.max_steps=2", "--run_dir=run", cwd=start,
                  timeout=150)
    assert (start / "run" / "final_model.pt").is_file() and list(elsewhere.iterdir()) == []
    assert proc.stdout.strip().splitlines()[-1].endswith("; run dir run"), proc.stdout


@pytest.mark.parametrize("signal, code, needle", [
    ("SIGSTOP", 4, "rank 1 is stopped in"),
    ("SIGKILL", 1, "dtrain launch: worker rank 1 (pid"),
])
def test_a_stopped_or_killed_rank_ends_the_job_promptly_and_honestly(tmp_path, signal, code, needle):
    proc = dtrain("launch", "--nproc-per-node", "2", FAULTS + "StopsItself", f"--task_args.signal={signal}",
                  "--dist.timeout_s=4", *SMALL, "--train.max_steps=6", f"--run_dir={tmp_path}/run",
                  cwd=REPO, check=False, timeout=150)
    assert proc.returncode == code and needle in proc.stderr, proc.stderr
    assert "py-spy" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if signal == "SIGKILL":
        assert "died from SIGKILL (killed: out of memory" in proc.stderr
    else:  # the mechanism that spares torchrun's 30 s shutdown wait: the peer ended the stopped rank
        assert "SIGSTOP or Ctrl-Z; ended it with SIGKILL" in proc.stderr, proc.stderr


@pytest.mark.parametrize("start_method, named", [
    ("forkserver", r"DataLoader worker 0 \(pid \d+\) was killed by SIGKILL while this rank loaded the batches "
                   r"of step "),
    ("fork", r"DataLoader worker \(pid \d+\) was killed by SIGKILL in task\.loss\(\) at step "),
], ids=["forkserver", "fork"])
def test_a_dataloader_worker_killed_mid_run_is_named_with_its_signal(tmp_path, start_method, named):
    # Worker 0 of rank 1 is killed by SIGKILL (as by the out-of-memory killer) at its 40th sample:
    # past the first steps, so not a mistake in the task (exit 1, not 2). Torch itself says only
    # that the worker "exited unexpectedly" (the forkserver, not the rank, is its parent), or, when
    # the rank is its parent (fork, spawn), raises its report from a signal handler wherever the
    # rank is: here in its step (its loss waits 0.1 s, so its workers are ahead of it).
    run = tmp_path / "run"
    proc = dtrain("launch", "--nproc-per-node", "2", FAULTS + "KillsADataWorker", *SMALL, "--data.num_workers=2",
                  f"--data.worker_start_method={start_method}", "--task_args.step_s=0.1", "--train.max_steps=40",
                  "--checkpoint.every_steps=2", f"--run_dir={run}", cwd=REPO, check=False, timeout=180)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match("dtrain launch: rank 1 failed first: " + named, last), proc.stderr
    assert "out-of-memory killer (see dmesg)" in last and "data.num_workers" in last, last
    assert "Traceback" not in proc.stderr, proc.stderr
    assert list((run / "checkpoints").iterdir()), "the checkpoints of earlier steps are kept"
