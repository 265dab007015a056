"""wandb end to end: never a login prompt, and a resumed job logs to the same run id with its steps
continuing after the checkpoint (offline: one id, one directory per attempt, read back here)."""

import json
import os
import pty
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_train.training.reporting.metrics import read_events
from tests.helpers import clean_env, dtrain, temp_leftovers

pytestmark = pytest.mark.slow


def wandb_env(home: Path) -> dict:
    """No API key, no WANDB_MODE, an empty HOME (no ~/.netrc): what a new user has."""
    env = clean_env(HOME=str(home))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_DIR"):
        env.pop(name, None)
    return env


def run_in_terminal(args: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    """Run with a pseudo-terminal as stdin/stdout/stderr; (None, output) when it is still running
    after `timeout` (a login prompt waits forever) — then it is killed."""
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                output += chunk
                if not chunk and proc.poll() is not None:
                    return proc.returncode, output.decode(errors="replace")
            elif proc.poll() is not None:
                return proc.returncode, output.decode(errors="replace")
        return None, output.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)


def test_no_key_no_mode_in_a_terminal_chooses_offline_without_a_prompt(tmp_path):
    run_dir = tmp_path / "run"
    code, output = run_in_terminal(
        [sys.executable, "-m", "distributed_train", "train", "--train.max_steps=3",
         "--log.every_steps=1", f"--run_dir={run_dir}"],
        wandb_env(tmp_path / "home"), timeout=150)
    assert code is not None, f"dtrain train hung (a login prompt?):\n{output[-2000:]}"
    assert code == 0, output[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, output[-2000:]
    assert "3/3" in output  # the progress bar was drawn on the terminal


# -- reading a .wandb transaction log: LevelDB-style 32 KiB blocks of protobuf Records -------------

def wandb_records(path: Path):
    """The wandb_internal_pb2.Record messages of a run-<id>.wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a .wandb log"
    pos, pending = 7, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left  # block trailer
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:
            pos += left  # zero padding to the end of the block
            continue
        pending += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb stores "a/b" keys as nested_key


def read_offline_run(run: Path) -> dict:
    """Run id, logged train steps, config keys and summary keys of one offline-run directory."""
    (log,) = run.glob("run-*.wandb")
    out = {"id": log.stem[len("run-"):], "steps": [], "config": set(), "summary": set()}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {_key(i): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                out["steps"].append(items["_step"])
        elif kind == "run":
            out["config"] |= {_key(i) for i in record.run.config.update}
        elif kind == "summary":
            out["summary"] |= {_key(i) for i in record.summary.update}
    return out


def test_offline_resume_logs_to_the_same_run_id_with_steps_after_the_checkpoint(tmp_path):
    run_dir, scratch = tmp_path / "run", tmp_path / "tmp"
    scratch.mkdir()
    env = {**wandb_env(tmp_path / "home"), "TMPDIR": str(scratch)}
    common = ["launch", "--nproc-per-node", "2", "--train.batch_size=32", "--log.every_steps=1",
              "--checkpoint.every_steps=5", "--log.wandb=offline", f"--run_dir={run_dir}"]
    dtrain(*common, "--train.max_steps=10", env=env, timeout=240)
    # The same command with a higher max_steps resumes from the committed checkpoint at step 10.
    dtrain(*common, "--train.max_steps=20", env=env, timeout=240)

    attempts = [read_offline_run(p) for p in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert len(attempts) == 2, "one wandb run per job (rank 0 only), one directory per attempt"
    assert len({a["id"] for a in attempts}) == 1, "a resumed job must log to the same run id"
    first, second = attempts
    assert first["steps"] == list(range(1, 11))
    assert second["steps"] == list(range(11, 21)), "the resumed history continues after step 10"
    assert {"world_size", "versions", "train", "seed"} <= first["config"]
    assert {"train_loss", "global_step", "resumed_from"} <= second["summary"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] and summary["global_step"] == 20
    train_steps = [e["step"] for e in read_events(run_dir) if e["kind"] == "train"]
    assert train_steps == list(range(1, 21))
    # wandb's temporary folders (removed at interpreter exit, which a worker skips) and torchrun's
    # went with the processes.
    assert not temp_leftovers(scratch)


def test_without_the_wandb_package_a_job_logs_to_its_file_and_an_explicit_mode_exits_2(tmp_path):
    """Images built on a vendor's base, and `pip install --no-deps` (which keeps a cluster's own
    torch), can lack wandb: the default mode trains and says so; asking for wandb is a usage error."""
    blocker = tmp_path / "no_wandb"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # import wandb fails\n")
    env = wandb_env(tmp_path / "home")
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env["PYTHONPATH"]])
    run_dir = tmp_path / "run"
    common = ["launch", "--nproc-per-node", "2", "--train.batch_size=32", f"--run_dir={run_dir}"]
    done = dtrain(*common, "--train.max_steps=4", "--log.every_steps=2", env=env, timeout=240)
    assert "wandb is not installed: every number goes to metrics.jsonl only" in done.stderr
    assert [e["step"] for e in read_events(run_dir) if e["kind"] == "train"] == [2, 4]
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4
    assert not (run_dir / "wandb").exists()

    refused = dtrain(*common, "--train.max_steps=8", "--log.wandb=offline", env=env, timeout=240, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert ("dtrain: error: log.wandb=offline needs the wandb package, which is not installed here "
            "(pip install wandb), or use log.wandb=disabled") in refused.stderr
    assert "Traceback" not in refused.stderr
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4  # nothing lost
