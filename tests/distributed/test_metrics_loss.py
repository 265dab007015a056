"""metrics.jsonl reports the GLOBAL mean loss across ranks, not rank 0's."""

import json

import pytest

from distributed_train.training.reporting.metrics import read_events
from tests.helpers import REPO, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

TASK = f"{REPO / 'tests' / 'tasks' / 'rank_dependent_loss.py'}:RankLoss"


def test_logged_loss_is_the_mean_of_the_ranks_losses(tmp_path):
    record = tmp_path / "losses"
    record.mkdir()
    run_ranks(train_in_rank, 2, [f"--task={TASK}", f"--task_args.record_dir={record}",
                                 "--train.batch_size=8", "--train.max_steps=4", "--train.lr=0.01",
                                 "--log.every_steps=2", f"--run_dir={tmp_path / 'run'}"])
    per_rank = [[float(v) for v in (record / f"rank{r}.txt").read_text().split()] for r in range(2)]
    assert [len(losses) for losses in per_rank] == [4, 4]
    train = [e for e in read_events(tmp_path / "run") if e["kind"] == "train"]
    assert [e["step"] for e in train] == [2, 4]
    for event, window in zip(train, [slice(0, 2), slice(2, 4)]):
        expected = sum(per_rank[0][window] + per_rank[1][window]) / 4
        rank0_only = sum(per_rank[0][window]) / 2
        assert abs(rank0_only - expected) > 1e-3, "the task must give the ranks different losses"
        assert event["loss"] == pytest.approx(expected, rel=1e-6)
    # Every log event carries the documented fields (grad norm measured without train.grad_clip).
    for key in ("epoch", "lr", "samples_per_s", "step_time_s", "data_wait", "grad_norm"):
        assert all(key in e for e in train), key
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "start" and start["world_size"] == 2 and start["resumed"] is False
