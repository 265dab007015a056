"""A stop signal that reaches ONE rank stops every rank after the same step.

Each scenario sends SIGTERM or SIGINT to one rank only (to itself at a known micro-batch, or from
its peer, so it lands wherever that rank is), and must end with: the same stop step and exit
code (143 / 130) on every rank, exactly one committed checkpoint, at that step, and a rerun that
resumes there and ends bit-identical to an uninterrupted run. Both gradient paths run it: the
shared-memory all-reduce and the backend's own (gloo, DDP's default hook, as under NCCL).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, fresh_port, run_ranks
from tests.tasks.stop_signal import PIDS_VAR, SPEC_VAR

pytestmark = pytest.mark.distributed

TASK = f"--task={REPO / 'tests' / 'tasks' / 'stop_signal.py'}:SignalledRegression"
STEPS = 40  # 96 samples, global batch 24: 4 steps per epoch; 2 micro-batches per rank and step
COMMON = [TASK, "--train.batch_size=24", "--train.micro_batch_size=6", f"--train.max_steps={STEPS}",
          "--train.optimizer=sgd", "--train.lr=0.05", "--seed=5", "--log.every_steps=4",
          "--checkpoint.every_steps=0", "--eval.batch_size=8", "--log.wandb=disabled",
          "--dist.timeout_s=20"]  # a hang fails with its diagnosis, well inside the test's timeout
# (signal, rank that receives it, rank that sends it, the sender's loss call: 2 per step)
SCENARIOS = [
    ("SIGTERM", 0, 0, 1),  # during the very first micro-batch: before any step is done
    ("SIGTERM", 1, 1, 8),  # the last micro-batch of step 4, just before the gradient all-reduce
    ("SIGTERM", 1, 0, 13),  # from the peer: lands wherever rank 1 is
    ("SIGTERM", 0, 1, 6),  # from the peer
    ("SIGINT", 1, 1, 3),
    ("SIGINT", 0, 1, 10),  # from the peer
]
EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}


def _train(run_dir: Path, port: int, extra: list[str]):
    """One job as this rank on a fresh port: (summary, None) or (None, Preempted)."""
    from distributed_train import distributed
    from distributed_train.cli.train import resolve_config
    from distributed_train.distributed.preemption import Preempted
    from distributed_train.training.run import run_training

    os.environ["MASTER_PORT"] = str(port)
    config = resolve_config(None, [*COMMON, *extra, f"--run_dir={run_dir}"])
    try:
        return run_training(config, distributed.read_env()), None
    except Preempted as exc:
        return None, exc


GRADIENT_PATHS = {"shared memory": ["--ddp.shm_allreduce=require"], "backend": ["--ddp.shm_allreduce=never"]}


def _vote_every_step(flag, step):
    return 1


def _uneven_intervals(flag, step):
    """Ranks propose different intervals (1 to 3 steps) that change as the run goes: they must
    still agree on when to vote (the mean of the proposals, rounded up)."""
    return 1 + (step + int(os.environ["RANK"])) % 3


INTERVALS = {"shared memory": _vote_every_step, "backend": _uneven_intervals}


def stop_then_resume(rank: int, world_size: int, tmp: Path) -> dict:
    """Every scenario on both gradient paths (one spawn: the jobs take ~0.3 s, spawning ~10 s)."""
    from distributed_train.distributed import preemption
    from distributed_train.training.checkpoints.commit import committed_checkpoints

    pids = tmp / "pids"
    pids.mkdir(exist_ok=True)
    (pids / f"rank-{rank}").write_text(str(os.getpid()))
    os.environ[PIDS_VAR] = str(pids)
    while len(list(pids.iterdir())) < world_size:
        time.sleep(0.01)
    load = lambda summary: torch.load(summary["final_model"], weights_only=True)  # noqa: E731
    (tmp / "ports").mkdir(exist_ok=True)
    jobs = iter(range(1000))
    port = lambda: fresh_port(rank, tmp / "ports", f"job-{next(jobs)}")  # noqa: E731
    outcomes = {}
    for path, extra in GRADIENT_PATHS.items():
        preemption.StopFlag._propose_interval = INTERVALS[path]  # timing-free, so never flaky
        reference, _ = _train(tmp / path / "reference", port(), extra)
        for i, (name, target, sender, call) in enumerate(SCENARIOS):
            run_dir = tmp / path / f"scenario-{i}"
            os.environ[SPEC_VAR] = f"{name}:{target}:{sender}:{call}"
            finished, stopped = _train(run_dir, port(), extra)
            del os.environ[SPEC_VAR]
            committed = [p.name for p in committed_checkpoints(run_dir / "checkpoints")]
            resumed, _ = _train(run_dir, port(), extra)  # "rerun the same command"
            outcomes[path, i] = {
                "finished": finished is not None,
                "step": stopped and stopped.step, "code": stopped and stopped.exit_code,
                "committed": committed, "resumed_from": resumed["resumed_from"],
                "identical": rank != 0 or all(torch.equal(a, b) for a, b in
                                              zip(load(resumed).values(), load(reference).values())),
            }
    return outcomes


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    ranks = run_ranks(stop_then_resume, 2, tmp_path, timeout=240)
    for path in GRADIENT_PATHS:
        for i, (name, target, sender, call) in enumerate(SCENARIOS):
            seen = [r[path, i] for r in ranks]
            where = f"{path} all-reduce, {name} to rank {target} from rank {sender} at loss call {call}: {seen}"
            assert not any(o["finished"] for o in seen), where
            step = seen[0]["step"]
            assert [o["step"] for o in seen] == [step, step] and 0 < step < STEPS, where
            assert [o["code"] for o in seen] == [EXIT_CODES[name]] * 2, where
            assert seen[0]["committed"] == [f"step-{step:08d}"], where
            assert seen[0]["resumed_from"].endswith(f"step-{step:08d}"), where
            assert seen[0]["identical"], where
