"""Run directories in object storage (`run_dir=s3://...`) against a real S3-compatible server
(tests/s3_server.py): every output lands in the bucket, a run killed mid-way resumes from the
bucket on another world size and another "node" (a fresh local folder) exactly, one job holds a
prefix, and a bucket that cannot be used stops the job with one line before training."""

import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from distributed_train.storage import Store
from distributed_train.training.checkpoints import commit, remote
from tests.helpers import EXACT, FP64, REPO, dtrain, free_port, max_diff, run_ranks, train_in_rank
from tests.s3_server import s3  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

AUGMENT = [FP64, "--task=tests.tasks.augment:AugmentTask", "--train.batch_size=12", "--train.lr=0.01",
           "--log.every_steps=5", "--checkpoint.every_steps=5", "--train.max_steps=20"]
TOY = ["--task=tests/tasks/toy.py:Regression", "--train.batch_size=8", "--log.wandb=disabled"]


def _bucket():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _model_in_bucket(url: str) -> dict:
    return torch.load(io.BytesIO(_bucket().cat_file(url)), weights_only=True)


def train_then_kill_rank_1(rank: int, world_size: int, overrides: list[str], step: int) -> dict:
    """train_in_rank, but rank 1 SIGKILLs itself in training step `step`."""
    from tests.tasks import augment

    augment.KILL_AT_STEP = step if rank == 1 else None
    return train_in_rank(rank, world_size, overrides)


def train_from_bucket(rank: int, world_size: int, overrides: list[str]) -> dict:
    """One rank of a whole job whose run_dir is a URL; rank 0 returns the summary and the model
    read back from the bucket."""
    from distributed_train import distributed
    from distributed_train.cli.train import resolve_config
    from distributed_train.training.run import run_training

    summary = run_training(resolve_config(None, ["--log.wandb=disabled", *overrides]), distributed.read_env())
    return {"summary": summary, "state": _model_in_bucket(summary["final_model"]) if rank == 0 else None}


def test_two_ranks_killed_then_three_ranks_on_another_node_resume_from_the_bucket_exactly(s3, tmp_path,  # noqa: F811
                                                                                         monkeypatch):
    url = "s3://runs/killed"
    killable = [*AUGMENT, "--task=tests.tasks.augment:KilledAugmentTask", f"--run_dir={url}"]
    monkeypatch.setenv("DTRAIN_CACHE_DIR", str(tmp_path / "node-a"))
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(run_ranks, train_in_rank, 1, [*AUGMENT, f"--run_dir={tmp_path / 'ref'}"])
        with pytest.raises(AssertionError, match=r"rank 0: .* of step 14 failed \(rank 1 |rank 1 exited with -9"):
            run_ranks(train_then_kill_rank_1, 2, killable, 14, timeout=150)
        reference = reference.result()[0]
    bucket = _bucket()
    committed = sorted(p.split("/")[-2] for p in bucket.find("runs/killed/checkpoints") if p.endswith("COMMITTED"))
    assert committed and committed[-1].rsplit("-", 1)[0] in ("step-00000005", "step-00000010"), committed
    assert not bucket.exists("runs/killed/final_model.pt")

    monkeypatch.setenv("DTRAIN_CACHE_DIR", str(tmp_path / "node-b"))  # nothing of node a is seen
    resumed = run_ranks(train_from_bucket, 3, killable)[0]
    summary = resumed["summary"]
    assert summary["resumed_from"] == f"{url}/checkpoints/{committed[-1]}"
    assert (summary["global_step"], summary["world_size"]) == (20, 3)
    assert summary["final_model"] == f"{url}/final_model.pt"
    assert max_diff(resumed["state"], reference["state"]) <= EXACT
    names = {p.rsplit("/", 1)[1] for p in bucket.ls("runs/killed")}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final_model.pt", "checkpoints"} <= names
    assert ".dtrain.lock" not in names  # released at the end
    assert json.loads(bucket.cat_file("runs/killed/summary.json"))["status"] == "done"
    events = [json.loads(line) for line in bucket.cat_file("runs/killed/metrics.jsonl").splitlines()]
    assert events[-1].get("step") == 20 and any(e.get("kind") == "checkpoint" for e in events)
    # the uncommitted save the kill interrupted (if any) was rotated away with the old checkpoints
    folders = {p.split("/")[-2] for p in bucket.find("runs/killed/checkpoints")}
    assert all(bucket.exists(f"runs/killed/checkpoints/{folder}/COMMITTED") for folder in folders)


def _agent(port: int, cache: str, steps: int, url: str, log) -> subprocess.Popen:
    env = {**os.environ, "DTRAIN_CACHE_DIR": cache, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "distributed_train", "launch", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"s3-{steps}",
         *TOY, FP64, "--checkpoint.every_steps=2", f"--train.max_steps={steps}", f"--run_dir={url}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_two_agents_without_a_shared_folder_checkpoint_to_the_bucket_and_resume_from_it(s3, tmp_path):  # noqa: F811
    url = "s3://runs/two-nodes"
    reference = dtrain("train", *TOY, FP64, "--train.max_steps=10", f"--run_dir={tmp_path / 'ref'}", cwd=REPO,
                       timeout=150)
    same_size = dtrain("launch", "--nproc-per-node", "2", *TOY, FP64, "--train.max_steps=10",
                       f"--run_dir={tmp_path / 'ref2'}", cwd=REPO, timeout=150)  # uninterrupted, 2 ranks
    assert reference.returncode == 0 and same_size.returncode == 0
    for attempt, steps in enumerate((6, 10)):
        port = free_port()
        logs = [open(tmp_path / f"agent-{attempt}-{n}.log", "w") for n in range(2)]
        agents = [_agent(port, str(tmp_path / f"node-{attempt}-{n}"), steps, url, logs[n]) for n in range(2)]
        codes = [agent.wait(timeout=240) for agent in agents]
        output = "\n".join((tmp_path / f"agent-{attempt}-{n}.log").read_text() for n in range(2))
        assert codes == [0, 0], output
    assert f"resuming from {url}/checkpoints/step-00000006-" in output, output
    state = _model_in_bucket(f"{url}/final_model.pt")
    expected = torch.load(tmp_path / "ref" / "final_model.pt", weights_only=True)
    assert max_diff(state, expected) <= EXACT
    uninterrupted = torch.load(tmp_path / "ref2" / "final_model.pt", weights_only=True)
    assert all(torch.equal(state[k], uninterrupted[k]) for k in uninterrupted)  # same world size: bit for bit
    summary = json.loads(_bucket().cat_file("runs/two-nodes/summary.json"))
    assert (summary["world_size"], summary["global_step"]) == (2, 10)
    events = [json.loads(line) for line in _bucket().cat_file("runs/two-nodes/metrics.jsonl").splitlines()]
    starts = [e for e in events if e.get("kind") == "start"]  # both attempts, though no folder was shared
    assert [(s["step"], bool(s.get("resumed"))) for s in starts] == [(0, False), (6, True)], starts


def test_a_second_job_on_a_prefix_exits_2_naming_the_holder_and_a_stale_lock_is_taken_over(s3, tmp_path):  # noqa: F811
    bucket = _bucket()
    holder = {"host": "node-7", "pid": 4242, "started": time.time() - 60, "heartbeat": time.time(), "token": "x"}
    bucket.pipe_file("runs/locked/.dtrain.lock", json.dumps(holder).encode())
    args = ["train", *TOY, "--train.max_steps=2", "--run_dir=s3://runs/locked"]
    proc = dtrain(*args, cwd=REPO, check=False, timeout=120,
                  env={**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "dtrain: error: run_dir 's3://runs/locked' is in use by another job (pid 4242 on node-7, started "), proc.stderr
    assert not bucket.exists("runs/locked/config.yaml")  # nothing written
    holder["heartbeat"] = time.time() - 3600  # that job died an hour ago without removing its lock
    bucket.pipe_file("runs/locked/.dtrain.lock", json.dumps(holder).encode())
    proc = dtrain(*args, cwd=REPO, timeout=120, env={**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "cache")})
    assert "took over a stale lock (pid 4242 on node-7" in proc.stderr, proc.stderr
    assert bucket.exists("runs/locked/final_model.pt") and not bucket.exists("runs/locked/.dtrain.lock")


@pytest.mark.parametrize("url, env, needle", [
    ("s3://no-such-bucket/run", {}, "writing s3://no-such-bucket/run/.dtrain-probe failed: the specified bucket "
                                    "does not exist"),
    ("s3://runs/unreachable", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"},
     "writing s3://runs/unreachable/.dtrain-probe failed: cannot connect"),
])
def test_a_bucket_that_cannot_be_used_is_one_line_and_exit_2_before_any_worker_starts(s3, tmp_path, url, env,  # noqa: F811
                                                                                      needle):
    proc = dtrain("launch", "--nproc-per-node", "2", *TOY, f"--run_dir={url}", cwd=REPO, check=False, timeout=120,
                  env={**os.environ, **env, "DTRAIN_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"dtrain: error: run_dir {url!r}: {needle}"] or \
        proc.stderr.strip().splitlines()[-1].startswith(f"dtrain: error: run_dir {url!r}: {needle}"), proc.stderr
    assert "Traceback" not in proc.stderr and "training" not in proc.stdout
    assert not (tmp_path / "cache").exists()  # the launcher refused it: no worker started


def test_export_runs_and_plot_read_a_run_directory_in_the_bucket(s3, tmp_path):  # noqa: F811
    env = {**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "cache")}
    dtrain("train", *TOY, "--train.max_steps=4", "--checkpoint.every_steps=2", "--run_dir=s3://runs/cli/one",
           cwd=REPO, timeout=120, env=env)
    final = _model_in_bucket("s3://runs/cli/one/final_model.pt")

    exported = dtrain("export", "s3://runs/cli/one", "-o", str(tmp_path / "model.pt"), cwd=tmp_path, env=env)
    assert "from s3://runs/cli/one/checkpoints/step-00000004-" in exported.stdout, exported.stdout
    assert max_diff(torch.load(tmp_path / "model.pt", weights_only=True), final) == 0
    folder = exported.stdout.strip().rsplit(" ", 1)[1]  # one committed checkpoint folder, by its URL
    dtrain("export", folder, "-o", str(tmp_path / "again.pt"), cwd=tmp_path, env=env)
    assert max_diff(torch.load(tmp_path / "again.pt", weights_only=True), final) == 0
    missing = dtrain("export", "s3://runs/cli/none", "-o", str(tmp_path / "x.pt"), cwd=tmp_path, env=env, check=False)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "dtrain: error: 's3://runs/cli/none' is neither a committed checkpoint nor a run directory with "
        "checkpoints or a final_model.pt"), missing.stderr

    table = dtrain("runs", "s3://runs/cli", cwd=tmp_path, env=env).stdout.splitlines()
    assert table[0].startswith("RUN") and table[1].split()[:4] == ["one", "toy.py:Regression", "4/4", "done"], table
    plotted = dtrain("plot", "s3://runs/cli/one", cwd=tmp_path, env=env)
    assert plotted.stdout.strip() == "one-metrics.png" and (tmp_path / "one-metrics.png").stat().st_size > 1000


def test_a_lost_connection_mid_run_is_one_line_and_keeps_the_committed_checkpoints_and_the_local_metrics(
        s3, tmp_path):  # noqa: F811
    from tests.s3_server import Cuttable

    link = Cuttable(int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    env = {**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "cache"), "AWS_MAX_ATTEMPTS": "1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{link.port}"}
    job = subprocess.Popen([sys.executable, "-m", "distributed_train", "launch", "--nproc-per-node", "2",
                            "--task=tests/tasks/fault_tasks.py:SlowSteps", "--task_args.sleep_s=0.1",
                            "--train.batch_size=8", "--log.wandb=disabled", "--log.every_steps=1",
                            "--train.max_steps=80", "--checkpoint.every_steps=2", "--run_dir=s3://runs/cut"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bucket = _bucket()
    deadline = time.monotonic() + 120
    while not [p for p in bucket.find("runs/cut/checkpoints") if p.endswith("COMMITTED")]:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    link.cut()  # the first checkpoint is committed: the network goes down
    out, err = job.communicate(timeout=180)
    errors = [line for line in err.splitlines() if line.startswith("dtrain: error:")]
    assert job.returncode == 1 and errors, err
    # The cut finds the next checkpoint's files on their way up, or its commit record: even the
    # first one's, when the server stored it but the link went down before its answer came back.
    assert re.match(r"dtrain: error: (rank \d: )?(uploading checkpoint \d+ failed: uploading to|committing "
                    r"checkpoint \d+ failed: writing) s3://runs/cut/checkpoints/step-\d{8}-\w+/\S+ failed: ",
                    errors[0]), err
    if "committing checkpoint" in errors[0]:  # stored or not, the user is told what the next start does
        assert errors[0].endswith("the next start resumes from the newest one the bucket lists as committed"), err
    assert "Traceback" not in err, err
    found, _ = remote.committed(Store("s3://runs/cut"))  # read past the cut link: the real server
    assert found, "the checkpoint committed before the cut is listed"
    local = remote.download(Store("s3://runs/cut"), found[-1], tmp_path / "check")
    assert commit.verify(local) is None
    metrics = tmp_path / "cache" / "runs" / "s3" / "runs" / "cut" / "metrics.jsonl"
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines()]
    assert max(s for s in steps if s) > found[-1].step  # the local copy went on after the last upload


def test_a_commit_record_stored_whose_answer_was_lost_is_one_line_and_the_next_start_resumes_from_it(
        s3, tmp_path):  # noqa: F811
    """The link goes down between the server storing checkpoint 2's commit record and its answer:
    the job cannot know whether the commit landed, says so in one line, and the next start finds
    checkpoint 2 committed and resumes from it."""
    from tests.s3_server import Cuttable

    link = Cuttable(int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    link.cut_after(rb"^PUT [^ ]*/checkpoints/step-00000002-[^/ ]+/COMMITTED[ ?]")
    args = ["launch", "--nproc-per-node", "2", *TOY, "--train.max_steps=6", "--checkpoint.every_steps=2",
            "--run_dir=s3://runs/lost-answer"]
    env = {**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "cache"), "AWS_MAX_ATTEMPTS": "1"}
    first = dtrain(*args, cwd=REPO, check=False, timeout=180,
                   env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{link.port}"})
    errors = [line for line in first.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert first.returncode == 1 and errors and link.is_cut, first.stderr
    assert re.match(r"dtrain: error: (rank \d: )?committing checkpoint 2 failed: writing s3://runs/lost-answer/"
                    r"checkpoints/step-00000002-\w+/COMMITTED failed: ", errors[0]), first.stderr
    assert errors[0].endswith("the next start resumes from the newest one the bucket lists as committed")
    found, _ = remote.committed(Store("s3://runs/lost-answer"))  # the real server: it was stored
    assert [c.step for c in found] == [2], found
    time.sleep(1.5)  # the first job's lock, which it could not remove, goes stale after 1 s here
    dtrain(*args, "--storage.upload_every_s=0.5", "--storage.lock_stale_s=1", cwd=REPO, timeout=180, env=env)
    summary = json.loads(_bucket().cat_file("runs/lost-answer/summary.json"))
    assert summary["global_step"] == 6 and "step-00000002-" in summary["resumed_from"], summary


def test_credentials_the_server_refuses_are_one_line_and_exit_2_before_any_worker_starts(tmp_path):
    from tests.s3_server import s3_server

    with s3_server(refuse_credentials=True) as env:  # every request checked: "testing" is no key it knows
        proc = dtrain("launch", "--nproc-per-node", "2", *TOY, "--run_dir=s3://runs/x", cwd=REPO, check=False,
                      timeout=120, env={**os.environ, **env, "DTRAIN_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "dtrain: error: run_dir 's3://runs/x': writing s3://runs/x/.dtrain-probe failed: "), proc.stderr
    assert "access key" in proc.stderr.lower() and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("stop", ["next checkpoint", "SIGTERM"])
def test_metrics_go_up_in_batches_and_a_job_whose_lock_was_taken_over_stops_and_commits_nothing_more(
        s3, tmp_path, stop):  # noqa: F811
    """The lock's heartbeat moves and the metrics go up while the job runs; once another job took the
    lock over (as after this job's heartbeat went stale), this job uploads nothing more (the other
    job's metrics.jsonl stays) and stops before its next checkpoint (exit 2, one line naming the
    other job), or, stopped by SIGTERM first, commits no stop checkpoint."""
    every = 40 if stop == "next checkpoint" else 0
    prefix = f"runs/taken-over-{every}"
    job = subprocess.Popen([sys.executable, "-m", "distributed_train", "train",
                            "--task=tests/tasks/fault_tasks.py:SlowSteps", "--task_args.sleep_s=0.05",
                            "--train.batch_size=8", "--log.wandb=disabled", "--log.every_steps=1",
                            "--train.max_steps=2000", f"--checkpoint.every_steps={every}",
                            "--storage.upload_every_s=0.2", "--storage.lock_stale_s=2", f"--run_dir=s3://{prefix}"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "cache")})
    bucket = _bucket()
    seen_sizes, heartbeats, saved = set(), set(), []
    deadline = time.monotonic() + 120
    try:
        while len(seen_sizes) < 3 or len(heartbeats) < 3 or (every and not saved):
            assert job.poll() is None and time.monotonic() < deadline, (seen_sizes, heartbeats)
            if bucket.exists(f"{prefix}/metrics.jsonl"):
                seen_sizes.add(bucket.size(f"{prefix}/metrics.jsonl"))
            if bucket.exists(f"{prefix}/.dtrain.lock"):
                heartbeats.add(json.loads(bucket.cat_file(f"{prefix}/.dtrain.lock"))["heartbeat"])
            saved = [c.step for c in remote.committed(Store(f"s3://{prefix}"))[0]]
            time.sleep(0.1)
        holder = json.loads(bucket.cat_file(f"{prefix}/.dtrain.lock"))
        assert holder["pid"] == job.pid and time.time() - holder["heartbeat"] < 60
        other = {**holder, "pid": 4321, "host": "elsewhere", "token": "other"}
        bucket.pipe_file(f"{prefix}/.dtrain.lock", json.dumps(other).encode())
        lines = []
        while not lines or "this job's lock was taken over" not in lines[-1]:  # its uploads end there
            lines.append(job.stderr.readline())
            assert lines[-1] and time.monotonic() < deadline, lines
        bucket.pipe_file(f"{prefix}/metrics.jsonl", b'{"kind": "start", "the other job": true}\n')
        if stop == "SIGTERM":
            job.terminate()
        job.wait(timeout=60)
        err = "".join(lines) + job.stderr.read()
    finally:
        job.kill()
    assert err.count("this job's lock was taken over by another job (pid 4321 on elsewhere") == 1, err
    last = err.strip().splitlines()[-1]
    if stop == "SIGTERM":
        assert job.returncode == 143, err
        assert f"SIGTERM: another job took over the lock of s3://{prefix}: no checkpoint committed" in err, err
        assert last.endswith("(no checkpoint to resume from)"), err
    else:
        assert job.returncode == 2, err
        assert last.startswith(f"dtrain: error: run_dir 's3://{prefix}' was taken over by another job (pid 4321 "
                               "on elsewhere") and "stopping, so that two jobs do not write one run directory" in last
    assert json.loads(bucket.cat_file(f"{prefix}/.dtrain.lock"))["token"] == "other"
    assert bucket.cat_file(f"{prefix}/metrics.jsonl") == b'{"kind": "start", "the other job": true}\n'
    # At most the save already in flight at the takeover completed; none was started after it.
    assert max((c.step for c in remote.committed(Store(f"s3://{prefix}"))[0]), default=0) <= max(saved, default=0) \
        + every, saved


def test_the_bucket_metrics_reach_each_checkpoint_before_the_next_batch_so_a_lost_node_loses_no_resume_point(
        tmp_path):
    """Metrics go up in batches (here one an hour) and right after each checkpoint: a node lost
    (SIGKILL) after a checkpoint leaves the bucket's metrics.jsonl with that checkpoint and every
    step before it, what goodput and `dtrain runs` read of the attempt. (A file URL: the same code.)"""
    bucket = tmp_path / "bucket" / "run"
    job = subprocess.Popen([sys.executable, "-m", "distributed_train", "train", *TOY,
                            "--task=tests/tasks/fault_tasks.py:SlowSteps", "--task_args.sleep_s=0.05",
                            "--log.every_steps=1", "--train.max_steps=2000", "--checkpoint.every_steps=4",
                            "--storage.upload_every_s=3600", "--storage.lock_stale_s=7200", f"--run_dir=file://{bucket}"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "cache")})
    deadline = time.monotonic() + 60
    try:
        while '"checkpoint"' not in ((bucket / "metrics.jsonl").read_text() if (bucket / "metrics.jsonl").exists()
                                     else ""):
            assert job.poll() is None and time.monotonic() < deadline, "no metrics upload after a checkpoint"
            time.sleep(0.05)
        assert job.poll() is None  # still running: not the upload at the end
    finally:
        job.kill()  # the node is lost: no last upload
        job.wait()
    events = [json.loads(line) for line in (bucket / "metrics.jsonl").read_text().splitlines()]
    saved = [e["step"] for e in events if e.get("kind") == "checkpoint"]
    assert saved and saved[0] == 4, events
    train = [e["step"] for e in events if e.get("kind") == "train"]
    assert train[:saved[-1]] == list(range(1, saved[-1] + 1)), events


def test_a_ddp_checkpoint_in_the_bucket_resumes_under_fsdp_on_another_world_size(s3, tmp_path):  # noqa: F811
    url = "s3://runs/engines"
    job = [*TOY, FP64, "--train.batch_size=12", "--checkpoint.every_steps=3", f"--run_dir={url}"]
    env = {**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "a")}
    dtrain("launch", "--nproc-per-node", "2", *job, "--train.max_steps=3", cwd=REPO, timeout=150, env=env)
    dtrain("launch", "--nproc-per-node", "3", *job, "--train.max_steps=6", "--engine=fsdp", cwd=REPO, timeout=150,
           env={**env, "DTRAIN_CACHE_DIR": str(tmp_path / "b")})
    reference = dtrain("train", *TOY, FP64, "--train.batch_size=12", "--train.max_steps=6",
                       f"--run_dir={tmp_path / 'ref'}", cwd=REPO, timeout=150)
    assert reference.returncode == 0
    expected = torch.load(tmp_path / "ref" / "final_model.pt", weights_only=True)
    assert max_diff(_model_in_bucket(f"{url}/final_model.pt"), expected) <= EXACT


def test_a_damaged_newest_checkpoint_in_the_bucket_is_skipped_and_the_previous_one_resumed(s3, tmp_path):  # noqa: F811
    env = {**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "cache")}
    args = [*TOY, "--checkpoint.every_steps=2", "--run_dir=s3://runs/damaged-run"]
    dtrain("train", *args, "--train.max_steps=4", cwd=REPO, timeout=120, env=env)
    bucket = _bucket()
    newest = sorted(p for p in bucket.find("runs/damaged-run/checkpoints") if p.endswith("__0_0.distcp"))[-1]
    assert "/step-00000004-" in newest
    size = bucket.size(newest)
    bucket.pipe_file(newest, b"\0" * size)  # same size, other bytes: only the checksum tells
    resumed = dtrain("train", *args, "--train.max_steps=6", cwd=REPO, timeout=120,
                     env={**env, "DTRAIN_CACHE_DIR": str(tmp_path / "elsewhere")})
    output = resumed.stdout + resumed.stderr
    assert "skipping damaged checkpoint s3://runs/damaged-run/checkpoints/step-00000004-" in output, output
    assert "__0_0.distcp fails its checksum" in output
    assert "resuming from s3://runs/damaged-run/checkpoints/step-00000002-" in output, output


def test_sigterm_commits_a_checkpoint_in_the_bucket_and_says_to_rerun(s3, tmp_path):  # noqa: F811
    import signal

    job = subprocess.Popen([sys.executable, "-m", "distributed_train", "launch", "--nproc-per-node", "2",
                            "--task=tests/tasks/fault_tasks.py:SlowSteps", "--task_args.sleep_s=0.1",
                            "--train.batch_size=8", "--log.wandb=disabled", "--train.max_steps=200",
                            "--checkpoint.every_steps=100", "--run_dir=s3://runs/stopped"], cwd=REPO,
                           env={**os.environ, "DTRAIN_CACHE_DIR": str(tmp_path / "cache")},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bucket = _bucket()
    deadline = time.monotonic() + 120
    while not bucket.exists("runs/stopped/config.yaml"):  # training has started
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    time.sleep(1)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    stop = re.search(r"stopped by SIGTERM after step (\d+); rerun the same command to continue", err)
    assert stop, err
    committed = [p for p in bucket.find("runs/stopped/checkpoints") if p.endswith("COMMITTED")]
    assert [p.split("/")[-2].rsplit("-", 1)[0] for p in committed] == [f"step-{int(stop.group(1)):08d}"], err
    assert not bucket.exists("runs/stopped/.dtrain.lock")
