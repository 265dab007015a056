"""`dtrain launch` and `torchrun launcher/train.py` as subprocesses on 2 CPU ranks: the run
directory matches the contract in ARCHITECTURE.md."""

import json
import shutil
import sys

import pytest
import torch
import yaml

from distributed_train.config import from_dict
from distributed_train.tasks.digits import DigitsTask
from tests.helpers import REPO, clean_env, dtrain, run_cmd, temp_leftovers, torchrun

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"global_step", "epochs_completed", "world_size", "train_loss", "eval", "samples_per_s",
                "wall_s", "final_model", "resumed_from"}
TRAIN_EVENT_KEYS = {"step", "epoch", "loss", "lr", "samples_per_s"}


def check_run_dir(run_dir, steps, cwd, world_size=2):
    """Assert the contract (files, config, metrics, summary, final model); returns (summary, events)."""
    assert sorted(p.name for p in run_dir.iterdir()) == \
        [".dtrain.lock", "config.yaml", "final_model.pt", "metrics.jsonl", "summary.json"]  # no checkpoints/wandb
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert run_dir.samefile(cwd / config.run_dir)  # the resolved run_dir, relative to the cwd
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e.get("kind") == "train"]
    assert train and all(TRAIN_EVENT_KEYS <= e.keys() for e in train)
    assert [e["step"] for e in train] == sorted(e["step"] for e in train) and train[-1]["step"] == steps
    assert all(e["samples_per_s"] > 0 and e["lr"] > 0 for e in train)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["world_size"] == world_size and summary["global_step"] == steps
    assert summary["resumed_from"] is None and summary["train_loss"] == train[-1]["loss"]
    state = torch.load(run_dir / "final_model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    DigitsTask().model().load_state_dict(state)  # strict: every key and shape fits
    return config, summary, events


def final_and_untrained_eval(run_dir, summary, seed=0) -> tuple[dict, dict]:
    """Digits' eval {accuracy, loss} of the run's final_model.pt and of the untrained model the same
    seed builds (the reference a trained model must beat); the summary's eval must be the former."""
    images, labels = DigitsTask().eval_dataset().tensors

    def evaluate(model):
        with torch.no_grad():
            logits = model(images)
        return {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
                "loss": torch.nn.functional.cross_entropy(logits, labels).item()}

    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the trainer seeds with `seed` right before building the model
        untrained = evaluate(DigitsTask().model())
    model = DigitsTask().model()
    model.load_state_dict(torch.load(run_dir / "final_model.pt", weights_only=True))
    final = evaluate(model)
    # The exact distributed eval reports this model: the same count of correct answers (one near-tie
    # allowed to flip between batchings), the same mean loss.
    assert summary["eval"]["accuracy"] == pytest.approx(final["accuracy"], abs=1.01 / len(labels)), summary
    assert summary["eval"]["loss"] == pytest.approx(final["loss"], rel=1e-4), summary
    return final, untrained


def test_default_launch_is_the_quickstart(tmp_path):
    """README quickstart: `dtrain launch` with no arguments trains digits on 2 CPU processes."""
    # The console script, as the README says; `python -m` where the package is not installed.
    script = shutil.which("dtrain")
    command = [script] if script else [sys.executable, "-m", "distributed_train"]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = run_cmd([*command, "launch"], cwd=tmp_path, env=clean_env(WANDB_MODE="disabled", TMPDIR=str(scratch)),
                   timeout=300)
    assert not temp_leftovers(scratch)
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("digits-")
    # digits' defaults: 20 epochs x 23 steps of 64 samples
    config, summary, events = check_run_dir(run_dirs[0], steps=460, cwd=tmp_path)
    assert config.task == "digits" and config.train.epochs == 20 and summary["epochs_completed"] == 20
    assert summary["eval"]["accuracy"] >= 0.95, summary["eval"]
    assert f"eval accuracy {summary['eval']['accuracy']:.4f}" in proc.stdout
    assert "step 460/460 train" in proc.stderr  # progress was printed


def test_launch_with_config_file_overrides_and_micro_batches(tmp_path):
    config_file = tmp_path / "job.yaml"
    config_file.write_text("train:\n  batch_size: 32\n  max_steps: 100\n  lr: 0.004\nlog:\n  every_steps: 4\n")
    run_dir = tmp_path / "run"
    dtrain("launch", "--nproc-per-node", "2", str(config_file), "--train.max_steps=12",
           "--train.micro_batch_size", "8", f"--run_dir={run_dir}", cwd=tmp_path)
    config, summary, events = check_run_dir(run_dir, steps=12, cwd=tmp_path)
    assert (config.train.batch_size, config.train.max_steps, config.train.micro_batch_size) == (32, 12, 8)
    assert config.train.lr == 0.004  # from the file
    assert [e["step"] for e in events if e["kind"] == "train"] == [4, 8, 12]
    assert [e["step"] for e in events if e["kind"] == "eval"] == [12]
    # 12 steps take digits from chance (~0.1, loss ~2.3) to ~0.77 (loss ~1.1): a broken step would not.
    final, untrained = final_and_untrained_eval(run_dir, summary)
    assert final["accuracy"] >= untrained["accuracy"] + 0.5 and final["loss"] <= 0.6 * untrained["loss"], \
        (final, untrained)


def test_torchrun_runs_the_launcher_script(tmp_path):
    run_dir = tmp_path / "run"
    torchrun("--standalone", "--nproc-per-node", "2", str(REPO / "launcher" / "train.py"),
             "--train.max_steps=30", "--log.every_steps=10", "--eval.every_steps=20", f"--run_dir={run_dir}",
             cwd=tmp_path)
    config, summary, events = check_run_dir(run_dir, steps=30, cwd=tmp_path)
    assert [e["step"] for e in events if e["kind"] == "train"] == [10, 20, 30]
    assert [e["step"] for e in events if e["kind"] == "eval"] == [20, 30]
    # 30 steps: ~0.9 accuracy, loss ~0.4, from chance (~0.1, loss ~2.3).
    final, untrained = final_and_untrained_eval(run_dir, summary)
    assert final["accuracy"] >= untrained["accuracy"] + 0.7 and final["loss"] <= 0.3 * untrained["loss"], \
        (final, untrained)


@pytest.mark.parametrize("launcher", ["dtrain launch", "torchrun"])
def test_every_rank_builds_the_same_data_from_a_set_of_strings(tmp_path, launcher):
    """A vocabulary in a set's order (`list(set(text))`) is the same on every rank under `dtrain
    launch` (its workers hash strings alike); under a launcher that does not see to it, rank 0 says so."""
    task = [f"--task={REPO / 'tests' / 'tasks' / 'toy.py'}:SetVocabulary", f"--task_args.out={tmp_path}",
            "--train.max_steps=2", "--train.batch_size=8", f"--run_dir={tmp_path / 'run'}"]
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("PYTHONHASHSEED", None)  # each process picks its own seed, as in a user's shell
    if launcher == "dtrain launch":
        proc = dtrain("launch", "--nproc-per-node", "2", *task, cwd=tmp_path, env=env)
    else:
        proc = torchrun("--standalone", "--nproc-per-node", "2", str(REPO / "launcher" / "train.py"), *task,
                        cwd=tmp_path, env=env)
    vocabularies = [(tmp_path / f"vocabulary-{rank}.txt").read_text() for rank in (0, 1)]
    warned = "the ranks hash strings differently" in proc.stderr
    if launcher == "dtrain launch":
        assert vocabularies[0] == vocabularies[1] and not warned, proc.stderr
    else:  # two interpreters' own seeds: another order (all 27 characters alike by chance: ~never)
        assert vocabularies[0] != vocabularies[1] and warned, proc.stderr
        assert "export PYTHONHASHSEED=0" in proc.stderr
