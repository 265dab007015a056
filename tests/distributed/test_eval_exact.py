"""Exact evaluation: on 3 ranks every eval sample is counted once, also when len % W != 0 and
len < W, and the metrics equal a single-process computation over the full eval set."""

import pytest
import torch

from tests.helpers import EXACT, FP64, REPO, run_ranks, train_in_rank
from tests.tasks.toy import Regression, regression_metrics

TOY = str(REPO / "tests" / "tasks" / "toy.py")
pytestmark = pytest.mark.distributed


def one_job(rank, world_size, tmp, n_eval):
    """Train briefly and evaluate on an eval set of `n_eval` samples (in float64: the metrics are
    compared with one process's, helpers.EXACT)."""
    return {n_eval: train_in_rank(rank, world_size, [
        FP64, f"--task={TOY}:Regression", f"--task_args.n_eval={n_eval}", "--train.batch_size=24",
        "--train.max_steps=2", "--eval.batch_size=9", f"--run_dir={tmp}/eval{n_eval}"])}


def single_process_metrics(state, n_eval):
    """The same metrics computed in one process over the whole eval set in one batch."""
    task = Regression()
    task.n_eval = n_eval
    model = task.model().double()
    model.load_state_dict(state)
    with torch.no_grad():
        pairs = regression_metrics(model, [t.double() if t.is_floating_point() else t
                                           for t in task.eval_dataset().tensors])
    return {name: (float(total), float(count)) for name, (total, count) in pairs.items()}


def test_eval_counts_every_sample_once_and_matches_one_process(tmp_path):
    # 50 % 3 = 2 (uneven shards), and 2 < 3 (rank 0 gets nothing): one spawn each.
    for n_eval in (50, 2):
        ranks = run_ranks(one_job, 3, str(tmp_path), n_eval)
        summaries = [r[n_eval]["summary"] for r in ranks]
        assert all(s["eval"] == summaries[0]["eval"] for s in summaries)  # every rank agrees
        evals = summaries[0]["eval"]
        expected = single_process_metrics(ranks[0][n_eval]["state"], n_eval)
        # Model-free checks: a padded (DistributedSampler) or dropped sample would change these.
        assert evals["id_mean"] == (n_eval - 1) / 2
        assert evals["first_ten"] == min(10, n_eval) / n_eval
        total, count = expected["sign_accuracy"]
        assert evals["sign_accuracy"] == total / count  # a count over the exact set
        total, count = expected["mse"]
        assert evals["mse"] == pytest.approx(total / count, rel=EXACT)
        assert evals["loss"] == pytest.approx(total / count, rel=EXACT)  # the default: mean task.loss
