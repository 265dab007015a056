"""Observability without a process group: wandb mode choice, the metrics.jsonl timeline, console
lines and progress bar, FLOPs / peak / MFU, and lazy imports of wandb and matplotlib."""

import io
import logging
import sys

import pytest
import torch
from torch import nn

from distributed_train.config import load_config
from distributed_train.distributed import DistEnv
from distributed_train.errors import UsageError
from distributed_train.training.reporting import flops
from distributed_train.training.reporting.metrics import (
    MetricsLogger,
    has_wandb_key,
    read_events,
    wandb_mode,
)
from distributed_train.training.reporting.progress import Progress, format_event

# -- wandb mode: never a login prompt --------------------------------------------------------------

def test_auto_is_offline_without_any_key(tmp_path):
    env = {"HOME": str(tmp_path)}
    assert not has_wandb_key(env)
    assert wandb_mode("auto", env) == "offline"


@pytest.mark.parametrize("env_extra, netrc_text", [
    ({"WANDB_API_KEY": "x" * 40}, None),
    ({}, "machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n"),
])
def test_auto_is_online_with_a_key(tmp_path, env_extra, netrc_text):
    if netrc_text:
        (tmp_path / ".netrc").write_text(netrc_text)
    env = {"HOME": str(tmp_path), **env_extra}
    assert wandb_mode("auto", env) == "online"


def test_a_netrc_for_another_host_or_server_counts_only_for_that_host(tmp_path):
    (tmp_path / ".netrc").write_text("machine wandb.example.com login u password secret\n")
    assert wandb_mode("auto", {"HOME": str(tmp_path)}) == "offline"
    env = {"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.example.com"}
    assert wandb_mode("auto", env) == "online"


def test_wandb_mode_env_and_explicit_choices(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert wandb_mode("auto", {**home, "WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode("offline", {**home, "WANDB_API_KEY": "k" * 40}) == "offline"
    assert wandb_mode("disabled", home) == "disabled"
    with pytest.raises(UsageError, match="log.wandb=online needs a W&B API key"):
        wandb_mode("online", home)
    with pytest.raises(UsageError, match="WANDB_API_KEY"):
        wandb_mode("auto", {**home, "WANDB_MODE": "online"})


def test_without_the_wandb_package_auto_logs_to_the_file_only_and_an_explicit_mode_is_refused(
        tmp_path, monkeypatch, package_log):
    home = {"HOME": str(tmp_path)}
    for env in (home, {**home, "WANDB_API_KEY": "k" * 40}, {**home, "WANDB_MODE": "offline"}):
        package_log.clear()
        assert wandb_mode("auto", env, installed=False) == "disabled"
        assert "wandb is not installed: every number goes to metrics.jsonl only" in package_log.text
    package_log.clear()
    assert wandb_mode("disabled", home, installed=False) == "disabled" and package_log.text == ""
    with pytest.raises(UsageError, match=r"^log\.wandb=offline needs the wandb package, which is not installed"):
        wandb_mode("offline", home, installed=False)
    with pytest.raises(UsageError, match=r"log\.wandb=online needs the wandb package"):
        wandb_mode("online", {**home, "WANDB_API_KEY": "k" * 40}, installed=False)
    from distributed_train.training.reporting.metrics import wandb_installed

    assert wandb_installed()  # the test environment has it
    monkeypatch.setitem(sys.modules, "wandb", None)  # what a blocked or half-removed install looks like
    assert not wandb_installed()
    assert wandb_mode("auto", home) == "disabled"


# -- metrics.jsonl -----------------------------------------------------------------------------------

def _logger(tmp_path, total=20, **log_keys):
    overrides = ["--log.wandb=disabled", f"--run_dir={tmp_path}"]
    overrides += [f"--log.{k}={v}" for k, v in log_keys.items()]
    return MetricsLogger(load_config(None, overrides), DistEnv(), tmp_path, total)


def test_a_resumed_attempt_replaces_what_a_killed_attempt_logged_after_the_checkpoint(tmp_path):
    first = _logger(tmp_path)
    first.start()
    for step in (5, 10, 15):
        first.log({"kind": "train", "step": step, "loss": 1.0 / step})
    first._file.write('{"kind": "train", "step": 1')  # a line torn by SIGKILL
    first._file.close()
    second = _logger(tmp_path)
    second.start(wandb_id="abc123", resumed_step=10)  # the checkpoint was at step 10
    second.log({"kind": "train", "step": 15, "loss": 0.5})
    second.log({"kind": "eval", "step": 20, "accuracy": float("nan")})
    second.close()
    assert second.wandb_id == "abc123"  # kept for the next checkpoint even with wandb disabled
    events = read_events(tmp_path)
    assert [(e["kind"], e["step"]) for e in events] == [
        ("start", 0), ("train", 5), ("train", 10), ("start", 10), ("train", 15), ("eval", 20)]
    assert events[4]["loss"] == 0.5 and events[3]["resumed"] is True
    assert events[5]["accuracy"] == "nan"  # JSON has no NaN: kept visible as a string
    raw = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(raw) == 8  # the file itself is append-only: the killed attempt's lines stay


def test_a_fresh_restart_in_the_same_run_dir_starts_a_new_timeline(tmp_path):
    for _ in range(2):
        logger = _logger(tmp_path)
        logger.start()
        logger.log({"kind": "train", "step": 5, "loss": 1.0})
        logger.close()
    assert [e["kind"] for e in read_events(tmp_path)] == ["start", "train"]


def test_non_main_ranks_write_nothing(tmp_path):
    config = load_config(None, ["--log.wandb=disabled"])
    logger = MetricsLogger(config, DistEnv(rank=1, world_size=2), tmp_path, 10)
    logger.log({"kind": "train", "step": 1, "loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


# -- console ------------------------------------------------------------------------------------------

def test_plain_lines_name_the_fields_and_the_eta(caplog):
    event = {"kind": "train", "step": 20, "epoch": 0, "loss": 1.23456, "samples_per_s": 1234.5,
             "data_wait": 0.05, "mfu": 0.4123, "time": 1.0}
    line = format_event(event, 100, eta_s=83)
    assert line == "step  20/100 train loss 1.2346 samples/s 1,234 data_wait 5% mfu 41.2% eta 1m23s"
    progress = Progress(100, start_step=10, tty=False, stream=io.StringIO())
    progress.started -= 10.0  # 10 steps took 10 s: 80 steps left take 80 s
    logger = logging.getLogger("distributed_train")
    with caplog.at_level(logging.INFO, logger="distributed_train"):
        logger.propagate = True
        try:
            progress.show({"kind": "train", "step": 20, "loss": 1.0})
        finally:
            logger.propagate = False
    assert progress.bar is None
    assert "step  20/100 train loss 1.0000 eta 1m20s" in caplog.text


def test_a_terminal_gets_a_tqdm_bar_that_continues_from_the_resumed_step():
    stream = io.StringIO()
    progress = Progress(50, start_step=10, tty=True, stream=stream)
    try:
        progress.advance(11)
        progress.show({"kind": "train", "step": 20, "loss": 0.5, "samples_per_s": 100.0})
        assert progress.bar.n == 20
    finally:
        progress.close()
    assert "20/50" in stream.getvalue() and "loss=0.5000" in stream.getvalue()


# -- FLOPs, peaks and MFU ---------------------------------------------------------------------------

class _LinearTask:
    def model(self):
        return nn.Linear(64, 10)

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def flops_per_sample(self):
        return None


def test_flops_are_counted_on_the_meta_device_without_touching_real_tensors():
    dataset = [(torch.randn(64), torch.tensor(1)) for _ in range(4)]
    per_sample = flops.task_flops_per_sample(_LinearTask(), dataset, None)
    # forward 2*64*10, weight gradient 2*64*10 (the input needs no gradient)
    assert per_sample == 4 * 64 * 10


def test_flops_are_counted_for_a_batch_in_a_mapping_that_is_not_a_dict():
    from tests.tasks.third_party import TokenizedReviews  # its collate gives a BatchEncoding-like UserDict

    task = TokenizedReviews()
    # embedding lookups count nothing; the head: forward, weight gradient and input gradient 2*16*1
    assert flops.count_flops_per_sample(task, task.train_dataset(), task.collate) == 6 * 16


def test_declared_flops_win_and_unknown_peaks_give_no_mfu():
    task = _LinearTask()
    task.flops_per_sample = lambda: 123.0
    assert flops.task_flops_per_sample(task, [], None) == 123.0
    assert flops.peak_flops(torch.device("cpu"), "fp32") is None
    assert flops.mfu(1e9, 100.0, None, 2) is None


@pytest.mark.parametrize("name, precision, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989),
    ("NVIDIA H100 PCIe", "bf16", False, 756),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494),
    ("NVIDIA H100 80GB HBM3", "fp32", False, 67),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312),
    ("NVIDIA H200", "bf16", False, 989),
    ("Tesla V100-SXM2-16GB", "bf16", False, None),  # no bf16 tensor cores
    ("Some Future GPU", "bf16", False, None),
])
def test_peak_table(name, precision, tf32, tflops):
    peak = flops.peak_flops_for_name(name, precision, tf32)
    assert peak == (tflops * 1e12 if tflops else None)


def test_mfu_is_model_flops_over_peak_of_all_devices():
    assert flops.mfu(1e9, 1000.0, 1e12, 2) == pytest.approx(0.5)
    meter = flops.MFUMeter(_LinearTask(), [(torch.randn(64), torch.tensor(0))] * 2, None,
                           torch.device("cpu"), "fp32", world_size=1, peak_tflops=1e-6)
    assert meter(1000.0) == pytest.approx(4 * 64 * 10 * 1000 / 1e6)


def test_wandb_init_waits_well_inside_the_collective_timeout(tmp_path, monkeypatch):
    # The other ranks wait in a collective while rank 0's wandb.init tries an unreachable server.
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    assert _logger(tmp_path)._wandb_timeout() == {"init_timeout": 90.0}  # dist.timeout_s=300: wandb's own
    short = MetricsLogger(load_config(None, ["--log.wandb=disabled", "--dist.timeout_s=60"]), DistEnv(), tmp_path, 5)
    assert short._wandb_timeout() == {"init_timeout": 20.0}
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "200")
    assert short._wandb_timeout() == {}  # the user's choice wins


def test_a_full_disk_under_metrics_jsonl_is_one_warning_and_training_goes_on(tmp_path):
    import logging
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    logger = _logger(tmp_path)
    logger.start()
    logger.log({"kind": "train", "step": 1, "loss": 1.0})
    logger._file.close()
    logger._file = open("/dev/full", "a", buffering=1)  # the disk fills up
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # whatever handlers and propagation earlier tests left configured
    logging.getLogger("distributed_train").addHandler(handler)
    try:
        for step in (2, 3):
            logger.log({"kind": "train", "step": step, "loss": 0.5})  # no exception: training goes on
        logger.close()
    finally:
        logging.getLogger("distributed_train").removeHandler(handler)
    warnings = [r.getMessage() for r in records]
    assert warnings == [f"cannot write {tmp_path / 'metrics.jsonl'}: no space left on device; later events go "
                        "to the console only"]
    assert [(e["kind"], e["step"]) for e in read_events(tmp_path)] == [("start", 0), ("train", 1)]


def test_a_long_evaluation_shows_progress_and_a_short_one_nothing(monkeypatch):
    import io
    import logging

    from distributed_train.training.reporting import progress

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("distributed_train")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        quiet = progress.EvalProgress(300, 4, enabled=True, tty=False)
        for _ in range(4):
            quiet.update()  # well under EVAL_LINE_EVERY_S: nothing
        assert lines == []
        monkeypatch.setattr(progress, "EVAL_LINE_EVERY_S", 0.0)  # in a log: a line per interval
        slow = progress.EvalProgress(300, 4, enabled=True, tty=False)
        slow.update()
        assert len(lines) == 1 and lines[0].startswith("step 300 eval: 1/4 batches in 0s, eta ")
        other_rank = progress.EvalProgress(300, 4, enabled=False, tty=False)
        other_rank.update()
        assert len(lines) == 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    monkeypatch.setattr(progress, "EVAL_QUIET_S", 0.0)  # on a terminal: a bar, cleared at the end
    screen = io.StringIO()
    bar = progress.EvalProgress(300, 4, enabled=True, tty=True, stream=screen)
    for _ in range(4):
        bar.update()
    assert bar.bar is not None and "eval at step 300" in screen.getvalue()
    bar.close()
    assert bar.bar is None
