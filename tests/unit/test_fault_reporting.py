"""Fault reporting without processes: the run lock, resume settings, eval metric checks, and what
`dtrain runs` / `dtrain plot` make of damaged or tiny runs (docs/faults.md)."""

import json
import multiprocessing
import os

import pytest
import torch

from distributed_train import cli, distributed
from distributed_train.config import load_config
from distributed_train.errors import UsageError
from distributed_train.training import run_lock
from distributed_train.training.checkpoints.checkpointer import (
    apply_hyperparameters,
    changed_settings,
    hyperparameters,
)
from distributed_train.training.evaluation import _on_device
from tests.unit.test_plot_runs import write_run

ONE = distributed.DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)


def test_second_lock_on_a_run_dir_names_the_holder_and_a_released_lock_never_blocks(tmp_path):
    first = run_lock.RunLock(tmp_path / "run", ONE)
    first.acquire()
    second = run_lock.RunLock(tmp_path / "run", ONE)
    with pytest.raises(UsageError, match=rf"run_dir '{tmp_path}/run' is in use by another job "
                                         rf"\(pid {os.getpid()} on .+, started \d{{4}}-"):
        second.acquire()
    first.release()  # what the kernel does when the holder dies: the file stays, the lock goes
    second.acquire()
    second.release()


def test_a_run_dir_deleted_or_replaced_under_the_job_stops_it_and_links_are_never_followed(tmp_path):
    import shutil

    first = run_lock.RunLock(tmp_path / "run", ONE)
    first.acquire()
    first.verify()  # still its own
    shutil.rmtree(tmp_path / "run")  # the lock went with the folder: another job can take it now
    second = run_lock.RunLock(tmp_path / "run", ONE)
    second.acquire()
    with pytest.raises(UsageError, match=r"run_dir '.*/run' was deleted or replaced while this job ran"):
        first.verify()  # the first job stops at its next checkpoint or at the end, not writing on
    second.verify()
    first.release()
    second.release()
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / run_lock.LOCK_FILE).symlink_to(victim)
    with pytest.raises(UsageError, match=r"\.dtrain\.lock is a symbolic link; refused"):
        run_lock.RunLock(planted, ONE).acquire()
    from distributed_train.training.reporting.metrics import open_for_append

    (planted / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UsageError, match=r"metrics\.jsonl is a symbolic link; refused"):
        open_for_append(planted / "metrics.jsonl")
    assert victim.read_text() == "keep me"


def _lock_and_die(path):
    run_lock.RunLock(path, ONE).acquire()
    os._exit(0)  # no release(): only the kernel frees the lock


def test_a_stale_lock_file_of_a_dead_job_does_not_block(tmp_path):
    proc = multiprocessing.get_context("spawn").Process(target=_lock_and_die, args=(tmp_path,))
    proc.start()
    proc.join(30)
    holder = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
    assert holder["pid"] == proc.pid  # the dead job's record is still there
    lock = run_lock.RunLock(tmp_path, ONE)
    lock.acquire()
    lock.release()


def test_no_locks_on_the_file_system_falls_back_to_the_holder_record(tmp_path, monkeypatch):
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    warnings = []
    monkeypatch.setattr(run_lock.log, "warning", lambda msg, *args: warnings.append(msg % args))
    run_lock.RunLock(tmp_path, ONE).acquire()  # nobody recorded: goes on, with a warning
    assert len(warnings) == 1 and "does not support locks" in warnings[0]
    record = {"host": run_lock.socket.gethostname(), "pid": os.getppid(), "started": 0}
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(record))  # a live process on this host
    with pytest.raises(UsageError, match="is in use by another job"):
        run_lock.RunLock(tmp_path, ONE).acquire()


def test_resume_lists_changed_settings_but_not_the_refused_or_per_attempt_ones():
    saved = {"seed": 0, "run_dir": "a", "train": {"lr": 0.1, "batch_size": 8}, "checkpoint": {"resume": "auto"}}
    current = {"seed": 1, "run_dir": "a", "train": {"lr": 0.2, "batch_size": 8}, "checkpoint": {"resume": "x"}}
    assert changed_settings(saved, current) == ["train.lr: 0.1 -> 0.2"]


def test_a_key_newer_than_the_checkpoint_is_a_change_only_when_set_to_other_than_its_default():
    from distributed_train.config import Config, to_dict

    current = to_dict(Config())
    saved = to_dict(Config())
    del saved["data"]["worker_start_method"]  # a checkpoint from before the key existed
    assert changed_settings(saved, current) == []
    current["data"]["worker_start_method"] = "spawn"
    assert changed_settings(saved, current) == ["data.worker_start_method: 'forkserver' -> 'spawn'"]


def test_loaded_optimizer_gets_the_current_lr_and_the_schedule_recomputed_at_the_resumed_step():
    from distributed_train.engines.common import lr_factor

    class Engine:
        def __init__(self, overrides):
            self.config = load_config(None, ["--train.schedule=cosine", "--train.max_steps=10", *overrides])
            self.model = torch.nn.Linear(2, 1)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.train.lr,
                                               weight_decay=self.config.train.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: lr_factor(step, self.config, 10))

    old = Engine(["--train.lr=0.1"])
    for _ in range(4):
        old.optimizer.step()
        old.scheduler.step()
    state = {"optimizer": old.optimizer.state_dict(), "scheduler": old.scheduler.state_dict()}
    same = Engine(["--train.lr=0.1"])
    new = Engine(["--train.lr=0.5", "--train.weight_decay=0.3"])
    for engine in (same, new):
        groups = hyperparameters(engine.optimizer)
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.scheduler.load_state_dict(state["scheduler"])
        apply_hyperparameters(engine, groups)
    assert same.optimizer.param_groups[0]["lr"] == old.optimizer.param_groups[0]["lr"]  # bit-identical
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr_factor(4, new.config, 10))
    assert new.optimizer.param_groups[0]["weight_decay"] == 0.3
    new.optimizer.step()
    new.scheduler.step()
    assert new.scheduler.get_last_lr()[0] == pytest.approx(0.5 * lr_factor(5, new.config, 10))


@pytest.mark.parametrize("value, needle", [
    (torch.ones(8), "its sum is a tensor of shape (8,) (sum it over the batch)"),
    ("low", "its sum is a str: 'low'"),
    (None, "its sum is a NoneType"),
])
def test_a_metric_that_is_not_a_number_names_the_metric(value, needle):
    with pytest.raises(UsageError) as info:
        _on_device("mse", "sum", value, torch.device("cpu"))
    assert "task.metrics()['mse'] must be (sum, count)" in str(info.value) and needle in str(info.value)
    assert _on_device("n", "count", torch.tensor([3]), torch.device("cpu")).item() == 3.0


def test_runs_skips_and_names_an_unreadable_run(tmp_path, capsys):
    write_run(tmp_path / "good", steps=10, total=10)
    bad = write_run(tmp_path / "bad", steps=10, total=10)
    with open(bad / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "step": 11, "loss": \xff}\n')  # one bad byte: that line only
    broken = write_run(tmp_path / "broken", steps=10, total=10)
    (broken / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": "x"}\n')
    (broken / "summary.json").write_text(json.dumps({"global_step": "ten"}))  # cannot be compared
    failed = write_run(tmp_path / "failed", steps=10, total=10)
    summary = json.loads((failed / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps({**summary, "status": "failed", "error": "RuntimeError: x"}))
    assert cli.main(["runs", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"good", "bad", "failed"} and " done " in rows["bad"] and " failed " in rows["failed"]
    assert err.count("dtrain runs: skipping") == 1 and "broken" in err


def test_plot_of_a_single_train_row_draws_markers(tmp_path):
    pytest.importorskip("matplotlib")
    from distributed_train.cli import plot

    run_dir = write_run(tmp_path / "run", steps=1, total=1, eval_every=1)
    fig = plot.draw(plot.load_run(run_dir), "one step")
    lines = [line for ax in fig.axes for line in ax.lines]
    assert lines and all(line.get_marker() == "o" for line in lines)
    assert all(len(line.get_xdata()) == 1 for line in lines)


def test_every_rank_writes_whole_lines_and_ranks_beyond_0_are_named():
    """print() writes a line's text and its newline separately; ranks share one pipe, so a line
    goes out in one write, never cut by another rank's."""
    import io

    from distributed_train.cli.train import RankPrefixed

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, text):
            self.calls.append(text)
            return super().write(text)

    for rank, prefix in ((0, ""), (1, "[rank 1] ")):
        sink = Writes()
        out = RankPrefixed(sink, rank)
        print("building the model", file=out)
        print("two\nlines", end="", file=out)
        assert sink.calls == [f"{prefix}building the model\n", f"{prefix}two\n"]
        out.flush()  # a line without its end yet: written as it is
        print("dtrain: error: rank 1: x", file=out)  # dtrain's own lines name their rank already
        assert sink.calls[2:] == [f"{prefix}lines", "dtrain: error: rank 1: x\n"]


def test_the_launcher_names_as_first_the_rank_that_did_not_fail_because_another_left():
    from types import SimpleNamespace

    from distributed_train.cli.launch import _failure_order

    def failure(time, after_peer):
        return SimpleNamespace(error_file_data={"dtrain": {"time": time, "printed": True, "after_peer": after_peer}},
                               timestamp=int(time))

    noticed = failure(100.0, True)  # rank 0 saw rank 1 leave before rank 1 recorded why
    cause = failure(100.2, False)
    assert sorted([noticed, cause], key=_failure_order) == [cause, noticed]
    # torchrun's SIGTERM ended a rank before it said a word: its time is torchrun's, in whole seconds
    stopped = SimpleNamespace(error_file_data={}, timestamp=100, exitcode=-15)
    assert sorted([stopped, cause], key=_failure_order) == [cause, stopped]
    killed = SimpleNamespace(error_file_data={}, timestamp=100, exitcode=-9)  # the OOM killer: a cause
    assert sorted([cause, killed], key=_failure_order) == [killed, cause]


@pytest.mark.parametrize("failure", ["UsageError", "TrainingFailure"])
def test_a_rank_that_leaves_the_line_to_rank_0_still_records_when_it_failed(tmp_path, monkeypatch, capsys, failure):
    """Without its own record the launcher would order this rank by torchrun's whole-second
    timestamp, and could call it the first to fail while naming another rank's line as the first."""
    import time

    from distributed_train import errors

    monkeypatch.setenv(errors.ERROR_FILE_VAR, str(tmp_path / "error.json"))
    before = time.time()
    with pytest.raises(SystemExit):
        with errors.user_errors(debug=False, quiet=True):  # a rank other than 0
            raise getattr(errors, failure)("writing checkpoint x failed: file too large")
    assert capsys.readouterr().err == ""
    recorded = json.loads((tmp_path / "error.json").read_text())
    assert recorded["message"] == "writing checkpoint x failed: file too large"
    assert recorded["dtrain"]["printed"] is False and recorded["dtrain"]["time"] >= before


def test_a_rank_that_fails_after_the_stores_host_left_asks_it_nothing(monkeypatch, capfd):
    """Rank 0 (or torchrun's agent) ended first: this rank's explanation reads the peers' heartbeats
    and leaves its own; through the store's connection each call would print c10d's warning with a
    C++ stack trace under the one line. The store's server is asked on a connection of its own."""
    import torch.distributed as torch_dist

    from distributed_train.distributed import diagnose
    from tests.helpers import free_port

    port = free_port()
    server = torch_dist.TCPStore("127.0.0.1", port, 2, True, wait_for_workers=False)
    store = torch_dist.PrefixStore("job/", torch_dist.TCPStore("127.0.0.1", port, 2, False))
    monkeypatch.setattr(diagnose, "_default_store", lambda: store)
    beat = diagnose.Heartbeat(rank=1, world_size=2, grace_s=60)
    beat.publish()
    assert set(diagnose.read_positions(2)) == {1}  # while the host is there: read as before
    del server  # its process ended
    assert diagnose.read_positions(2) is None
    beat.publish(left="CheckpointWriteFailed: writing checkpoint x failed: file too large")
    err = capfd.readouterr().err
    assert "TCPStore" not in err and "frame #" not in err, err


@pytest.mark.parametrize("options, kept", [([], False), (["--tee", "3"], True), (["--redirects", "1"], True),
                                           (["--log-dir", "LOGS"], True)])
def test_torchruns_error_files_go_with_the_launch_unless_its_logs_are_asked_for(tmp_path, monkeypatch, options, kept):
    """Without --log-dir torchrun leaves a torchelastic_* folder per launch: the launcher gives it one
    that goes when the launch ends, unless the workers' output is written there (--tee, --redirects)
    or the folder is the user's."""
    import tempfile

    from distributed_train.cli.launch import _error_files_dir, torchrun_parser

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    parsed = torchrun_parser().parse_args([o.replace("LOGS", str(tmp_path / "logs")) for o in options] + ["x.py"])
    given = parsed.log_dir
    with _error_files_dir(parsed):
        used = parsed.log_dir
        if not kept:
            assert used and os.path.isdir(used) and os.path.dirname(used) == str(tmp_path)
    assert parsed.log_dir == given
    assert (used == given) if kept else not os.path.exists(used)
