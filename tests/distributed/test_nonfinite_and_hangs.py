"""train.nonfinite on real gloo ranks: `error` stops every rank naming the step and the rank and
commits no poisoned checkpoint; `skip` skips the same steps everywhere and the ranks stay equal."""

import json

import pytest
import torch

from distributed_train.training.checkpoints.commit import committed_checkpoints
from tests.helpers import run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

NAN_TASK = "--task=tests.tasks.broken_tasks:NaNLoss"
SMALL = ["--train.batch_size=8", "--train.max_steps=6", "--eval.every_steps=0"]


def _train_nan(rank: int, world_size: int, overrides: list[str]) -> dict:
    from distributed_train.errors import NonFiniteLoss
    from tests.tasks.broken_tasks import NaNLoss

    try:
        out = train_in_rank(rank, world_size, overrides)
    except NonFiniteLoss as exc:
        return {"error": str(exc), "exit_code": exc.exit_code}
    return {"summary": out["summary"], "params": NaNLoss.last_model.state_dict()}


def test_nonfinite_error_names_step_and_rank_and_commits_nothing_poisoned(tmp_path):
    # NaN on rank 1 at step 3; checkpoints every 2 steps, logs every 5: the checkpoint of step 4
    # would hold the poisoned state, so the check before committing it must stop the run.
    overrides = [NAN_TASK, *SMALL, f"--run_dir={tmp_path}", "--checkpoint.every_steps=2",
                 "--log.every_steps=5", "--task_args.rank=1", "--task_args.step=3"]
    results = run_ranks(_train_nan, 2, overrides)
    for result in results:
        assert result.get("exit_code") == 3, result
        assert "non-finite loss" in result["error"] and "at step 3 on rank 1" in result["error"]
        assert "train.nonfinite=skip" in result["error"]
    steps = [int(p.name.split("-")[-1]) for p in committed_checkpoints(tmp_path / "checkpoints")]
    assert steps == [2], steps


def _train_after_an_aborted_reduction(rank: int, world_size: int, overrides: list[str], garbage: str) -> dict:
    """What NCCL leaves when its watchdog aborts the group under a host read (error handling 2): the
    buffer as it was (this rank's own numbers) or anything else (here NaN), and no error."""
    from distributed_train.distributed import group
    from distributed_train.errors import CommunicationFailure, NonFiniteLoss

    def aborted_sum(tensor):
        return tensor.fill_(float("nan")) if garbage == "nan" else tensor

    group.all_reduce_sum = aborted_sum
    try:
        train_in_rank(rank, world_size, overrides)
    except (NonFiniteLoss, CommunicationFailure) as exc:
        return {"type": type(exc).__name__, "exit_code": exc.exit_code, "error": str(exc)}
    return {"type": None}


@pytest.mark.parametrize("garbage", ["nan", "unreduced"])
def test_a_reduction_read_after_the_group_was_aborted_is_a_communication_failure(tmp_path, garbage):
    """Neither the task's NaN (exit 3) nor a wrong loss in the log: the read is checked (every rank
    counts itself in it), and the corrupt result is reported as the communication failure it is."""
    overrides = ["--task=tests.tasks.toy:Regression", *SMALL, f"--run_dir={tmp_path}", "--log.every_steps=2"]
    for result in run_ranks(_train_after_an_aborted_reduction, 2, overrides, garbage):
        assert result["type"] == "CommunicationFailure" and result["exit_code"] == 4, result
        assert "all-reduce of the train loss came back corrupt" in result["error"], result
    assert not (tmp_path / "metrics.jsonl").exists() or '"train"' not in (tmp_path / "metrics.jsonl").read_text()


def _train_after_an_aborted_vote(rank: int, world_size: int, overrides: list[str], garbage: str) -> dict:
    """The stop vote's all-reduce aborted the same way, on the vote after step 3 (earlier votes real):
    its buffer is this rank's own ballot, or a stop code and nothing else."""
    from distributed_train.distributed import preemption
    from distributed_train.errors import CommunicationFailure

    real, votes = preemption._all_reduce_async, []

    def aborted(vote):
        votes.append(vote)
        if len(votes) < 3:
            return real(vote)
        if garbage == "stop":
            vote.zero_()[2] = 1  # "SIGTERM", as a MAX of codes would read garbage
        return real(torch.zeros(1, dtype=torch.int64))  # a completed Work on another buffer

    preemption._all_reduce_async = aborted
    preemption.StopFlag._propose_interval = lambda flag, step: 1  # a vote after every step
    try:
        out = train_in_rank(rank, world_size, overrides)
    except CommunicationFailure as exc:
        return {"type": type(exc).__name__, "exit_code": exc.exit_code, "error": str(exc), "votes": len(votes)}
    return {"type": None, "summary": out["summary"]}


@pytest.mark.parametrize("garbage", ["stop", "unreduced"])
def test_a_stop_vote_after_the_group_was_aborted_is_a_communication_failure(tmp_path, garbage):
    """Neither a stop no rank asked for (exit 143, a checkpoint) nor a missed one: every rank counts
    itself in the vote, and a vote not every rank is counted in is a communication failure."""
    overrides = ["--task=tests.tasks.toy:Regression", *SMALL, f"--run_dir={tmp_path}", "--log.every_steps=100"]
    for result in run_ranks(_train_after_an_aborted_vote, 2, overrides, garbage):
        assert result["type"] == "CommunicationFailure" and result["exit_code"] == 4, result
        counted = {"stop": 0, "unreduced": 1}[garbage]
        assert f"the stop vote came back corrupt ({counted} of 2 ranks counted)" in result["error"], result
        assert result["votes"] == 3, result
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_nonfinite_skip_skips_on_every_rank_and_keeps_ranks_equal(tmp_path):
    overrides = [NAN_TASK, *SMALL, f"--run_dir={tmp_path}", "--train.nonfinite=skip",
                 "--log.every_steps=2", "--task_args.rank=1", "--task_args.step=3", "--task_args.every=2"]
    first, second = run_ranks(_train_nan, 2, overrides)
    assert first["summary"]["global_step"] == 6
    for name, value in first["params"].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, second["params"][name]), f"{name} differs between ranks"
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e.get("kind", "train") == "train"]
    assert [e["skipped_steps"] for e in train] == [0, 1, 2], train  # NaN at steps 3 and 5 on rank 1
    assert all(isinstance(e["loss"], float) for e in train), train
