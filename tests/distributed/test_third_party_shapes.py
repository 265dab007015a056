"""Code in the shapes nobody here wrote (tests/tasks/third_party.py) trains as it would alone:
2 ranks give one process's parameters where the math allows; where it does not (BatchNorm), the
user is told, and the ranks still hold one model."""

import pytest
import torch

from distributed_train.cli.train import resolve_config
from distributed_train.distributed import DistEnv
from distributed_train.training.run import run_training
from tests import helpers
from tests.helpers import EXACT, FP64, max_diff, run_ranks, train_in_rank
from tests.tasks import third_party

pytestmark = pytest.mark.distributed

TASKS = "tests.tasks.third_party"
COMMON = [FP64, "--train.batch_size=24", "--train.max_steps=12", "--seed=5", "--log.wandb=disabled"]


def one_process(run_dir, *extra):
    summary = run_training(resolve_config(None, ["--log.wandb=disabled", *extra, f"--run_dir={run_dir}"]),
                           DistEnv())
    return summary, torch.load(summary["final_model"], weights_only=True)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_nanogpt_style_model_with_tied_weights_its_optimizer_groups_and_get_lr(tmp_path, engine):
    args = [f"--task={TASKS}:NanoGPT", *COMMON, f"--engine={engine}"]
    summary, alone = one_process(tmp_path / "one", *args)
    assert summary["train_loss"] < 3.45  # ln(32) = 3.47 at the start: it learns
    # tied: one tensor under both names, in the final model too
    assert torch.equal(alone["lm_head.weight"], alone["transformer.wte.weight"])
    two = run_ranks(train_in_rank, 2, [*args, "--train.micro_batch_size=4", f"--run_dir={tmp_path / 'two'}"])
    assert max_diff(two[0]["state"], alone) < EXACT


def test_padded_variable_length_batches(tmp_path):
    args = [f"--task={TASKS}:PaddedSequences", *COMMON, "--train.optimizer=sgd", "--train.lr=0.05"]
    _, alone = one_process(tmp_path / "one", *args)
    for world_size in (2, 3):
        ranks = run_ranks(train_in_rank, world_size, [*args, f"--run_dir={tmp_path / f'w{world_size}'}"])
        assert max_diff(ranks[0]["state"], alone) < EXACT, world_size


def test_a_resnet_with_batchnorm_trains_and_keeps_one_model(tmp_path):
    """Per-rank batch statistics are not one process's math (the one-line warning that says so:
    tests/unit/test_engine.py); the job trains, and rank 0's buffers are the model's."""
    args = [f"--task={TASKS}:TinyResNet", *COMMON, "--train.optimizer=sgd", "--train.lr=0.1"]
    ranks = run_ranks(train_in_rank, 2, [*args, f"--run_dir={tmp_path / 'two'}"])
    assert ranks[0]["summary"]["global_step"] == 12
    _, alone = one_process(tmp_path / "one", *args)
    assert max_diff(ranks[0]["state"], alone) > 1e-6  # per-rank batch statistics: not the same math
    assert "1.running_mean" in ranks[0]["state"]  # the buffers DDP broadcasts from rank 0 are saved


@pytest.mark.parametrize("name", ["TextReviews", "TokenizedReviews"])
def test_text_batches_strings_and_a_tokenizers_mapping_train_and_evaluate_as_one_process(tmp_path, name):
    """Batches that hold strings, or come as a mapping that is not a dict (transformers'
    BatchEncoding is a UserDict): moved to the device whole, counted for the eval mean, and the
    eval over 13 samples the same on 1, 2 and 3 ranks."""
    args = [f"--task={TASKS}:{name}", *COMMON, "--train.batch_size=12", "--train.optimizer=sgd", "--train.lr=0.5"]
    summary, alone = one_process(tmp_path / "one", *args)
    assert summary["eval"]["loss"] < 0.69  # ln 2 at the start: it learns
    for world_size in (2, 3):
        ranks = run_ranks(train_in_rank, world_size, [*args, f"--run_dir={tmp_path / f'w{world_size}'}"])
        assert max_diff(ranks[0]["state"], alone) < EXACT, world_size
        assert abs(ranks[0]["summary"]["eval"]["loss"] - summary["eval"]["loss"]) < EXACT, world_size


def test_a_loss_summed_over_tokens_with_its_count_is_one_processs_mean_on_any_split(tmp_path):
    """Padded causal-LM batches (labels -100 where there is no token): each micro-batch holds
    another number of real tokens, so the mean of per-batch token means depends on how the
    global batch is split. task.loss returning (sum, count) makes every split, on 1-3 ranks,
    with accumulation and under each engine, give one process's token mean and parameters."""
    args = [f"--task={TASKS}:PaddedTokens", *COMMON, "--train.batch_size=12", "--train.max_steps=8",
            "--train.optimizer=sgd", "--train.lr=0.5"]
    summary, alone = one_process(tmp_path / "one", *args)
    splits = {
        2: [("w2", []), ("w2-accumulate", ["--train.micro_batch_size=2"]),
            ("w2-fsdp", ["--engine=fsdp", "--train.micro_batch_size=3"]),
            ("w2-accelerate", ["--engine=accelerate", "--train.micro_batch_size=3"]),
            ("w2-means", [f"--task={TASKS}:PaddedTokensMean"])],
        3: [("w3", []), ("w3-accumulate", ["--train.micro_batch_size=1"])],
    }
    runs = {}
    for world_size, jobs in splits.items():
        runs.update(helpers.run_jobs(world_size, [(name, [*args, *extra, f"--run_dir={tmp_path / name}"])
                                                  for name, extra in jobs]))
    _, accumulated = one_process(tmp_path / "one-accumulate", *args, "--train.micro_batch_size=3")
    runs["w1-accumulate"] = {"state": accumulated}
    for name, run in runs.items():
        if name != "w2-means":
            assert max_diff(run["state"], alone) < EXACT, name
    # The per-batch mean is another objective: its model is not one process's (which it is at W=1).
    _, means_alone = one_process(tmp_path / "m1", *args, f"--task={TASKS}:PaddedTokensMean")
    assert max_diff(runs["w2-means"]["state"], means_alone) > 1e-6
    # The logged loss and the eval loss are token means over every token, as computed here.
    task, model = third_party.PaddedTokens(), third_party.PaddedTokens().model().double()
    model.load_state_dict(alone)
    with torch.no_grad():
        batch = task.collate([task.eval_dataset()[i] for i in range(13)])
        total, count = task.token_losses(model, batch)
    assert summary["eval"]["loss"] == pytest.approx(float(total / count), rel=EXACT)
    assert runs["w3-accumulate"]["summary"]["eval"]["loss"] == pytest.approx(float(total / count), rel=EXACT)
    assert runs["w2-fsdp"]["summary"]["train_loss"] == pytest.approx(summary["train_loss"], rel=EXACT)
