"""Training on an IterableDataset (training/iterable.py): the same global batches on any world
size and with DataLoader workers, passes that end together, and exact resume on any world size."""

import json

import pytest
import torch

from distributed_train.cli.train import resolve_config
from distributed_train.distributed import DistEnv
from distributed_train.errors import UsageError
from distributed_train.training.run import run_training
from tests.helpers import EXACT, FP64, max_diff, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

STREAMS = "tests.tasks.streams"  # by module name: the test reads its classes' counters
# 100 samples a pass, global batch 24: 4 steps a pass (4 samples dropped), so 10 steps cross two
# pass boundaries. In float64: compared across world sizes at helpers.EXACT.
COMMON = [FP64, "--train.batch_size=24", "--train.max_steps=10", "--train.optimizer=sgd", "--train.lr=0.05",
          "--seed=3", "--log.every_steps=1", "--eval.batch_size=8", "--log.wandb=disabled"]


def job(run_dir, *extra):
    return [f"--task={STREAMS}:StreamingRegression", *COMMON, f"--run_dir={run_dir}", *extra]


def train_here(*args):
    summary = run_training(resolve_config(None, list(args)), DistEnv())
    return summary, torch.load(summary["final_model"], weights_only=True)


def epochs_logged(run_dir):
    return [e["epoch"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if e["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stream") / "one"
    return (*train_here(*job(run_dir)), run_dir)


def test_two_and_three_ranks_and_workers_train_the_same_model_as_one_process(reference, tmp_path):
    summary, state, run_dir = reference
    assert summary["global_step"] == 10 and summary["epochs_completed"] == 2
    assert epochs_logged(run_dir) == [0] * 4 + [1] * 4 + [2] * 2  # 4 whole global batches a pass
    for world_size, extra in ((2, ["--train.micro_batch_size=4"]), (3, [])):
        results = run_ranks(train_in_rank, world_size, job(tmp_path / f"w{world_size}", *extra))
        assert max_diff(results[0]["state"], state) < EXACT, world_size
    _, with_workers = train_here(*job(tmp_path / "workers", "--data.num_workers=2", "--train.micro_batch_size=6"))
    assert max_diff(with_workers, state) < EXACT


@pytest.mark.parametrize("stateful", [False, True])
def test_resume_is_exact_on_another_world_size(reference, tmp_path, capsys, stateful):
    """Stopped at step 6 on 2 ranks, resumed on 1: the parameters of the uninterrupted run. A
    stateful dataset resumes from its state without re-reading; another re-reads and warns."""
    from tests.tasks.streams import RegressionStream

    extra = [f"--task_args.stateful={str(stateful).lower()}", "--checkpoint.every_steps=3"]
    run_dir = tmp_path / "run"
    run_ranks(train_in_rank, 2, job(run_dir, *extra, "--train.max_steps=6"))  # pass 1, step 2 of 4
    before = RegressionStream.reads[0]
    capsys.readouterr()
    _, resumed = train_here(*job(run_dir, *extra))
    err = capsys.readouterr().err
    rereads = "resuming the stream of task.train_dataset() by reading its first 48 samples of pass 1 again"
    assert (rereads in err) != stateful, err
    # this process read: the rest of pass 1 (stateful) or all of it, then pass 2's first 2 steps
    assert RegressionStream.reads[0] - before == (52 if stateful else 100) + 48
    assert max_diff(resumed, reference[1]) < EXACT


def test_a_stream_needs_max_steps_a_whole_batch_and_a_map_style_eval_set(tmp_path):
    base = [f"--task={STREAMS}:StreamingRegression", "--train.batch_size=24", "--log.wandb=disabled"]
    with pytest.raises(UsageError, match=r"is an IterableDataset \(a stream without a length\): set train.max_steps"):
        train_here(*base, f"--run_dir={tmp_path / 'a'}")
    with pytest.raises(UsageError, match="yielded fewer samples than one global batch"):
        train_here(*base, "--task_args.n=20", "--train.max_steps=2", f"--run_dir={tmp_path / 'b'}")
    with pytest.raises(UsageError, match=r"task.eval_dataset\(\) returned an IterableDataset; evaluation counts"):
        train_here(*base, f"--task={STREAMS}:StreamingEval", "--train.max_steps=2", f"--run_dir={tmp_path / 'c'}")


def test_a_hugging_face_streaming_dataset_trains_alike_on_any_world_size_and_resumes_from_its_state(tmp_path,
                                                                                                   capsys):
    pytest.importorskip("datasets", reason="datasets is not installed")
    from tests.tasks.streams import write_json_lines

    write_json_lines(tmp_path / "data.jsonl")
    hf = [f"--task={STREAMS}:HFJsonStream", f"--task_args.path={tmp_path / 'data.jsonl'}", "--train.micro_batch_size=4"]
    _, one = train_here(*job(tmp_path / "one", *hf))
    two = run_ranks(train_in_rank, 2, job(tmp_path / "two", *hf))[0]["state"]
    assert max_diff(two, one) < EXACT
    run_ranks(train_in_rank, 2, job(tmp_path / "run", *hf, "--train.max_steps=6", "--checkpoint.every_steps=3"))
    capsys.readouterr()
    _, resumed = train_here(*job(tmp_path / "run", *hf, "--checkpoint.every_steps=3"))
    assert "resuming the stream" not in capsys.readouterr().err  # from the dataset's own state
    assert max_diff(resumed, one) < EXACT
    with pytest.raises(UsageError, match=r"already split by node \(split_dataset_by_node\); return the whole"):
        train_here(*job(tmp_path / "split", *hf, "--task_args.split_by_node=true"))
    # a stream of several shards splits itself across DataLoader workers: refused with workers
    write_json_lines(tmp_path / "more.jsonl")
    shards = [f"--task_args.path=[{tmp_path / 'data.jsonl'}, {tmp_path / 'more.jsonl'}]"]
    with pytest.raises(UsageError, match=r"is a stream of 2 shards that splits itself across DataLoader workers"):
        train_here(*job(tmp_path / "workers", *hf, *shards, "--data.num_workers=2"))
