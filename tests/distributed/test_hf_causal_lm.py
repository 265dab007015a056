"""A Hugging Face causal LM (built from a tiny config, no download) trains under DDP on token files."""

import pytest

from tests.helpers import REPO, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

TASK = f"{REPO / 'examples' / 'hf_causal_lm.py'}:HFCausalLMTask"
TINY_LLAMA = ["--task_args.model_type=llama", "--task_args.config.hidden_size=32",
              "--task_args.config.intermediate_size=64", "--task_args.config.num_hidden_layers=2",
              "--task_args.config.num_attention_heads=2", "--task_args.config.num_key_value_heads=2",
              "--task_args.seq_len=32"]


def test_tiny_llama_trains_on_two_ranks_and_its_decoder_layers_are_the_units(tmp_path):
    from distributed_train.cli import prepare_tokens
    from distributed_train.cli.train import resolve_config
    from distributed_train.task import load_task

    text = (REPO / "distributed_train" / "tasks" / "charlm.py").read_text() * 4
    (tmp_path / "corpus.txt").write_text(text)
    assert prepare_tokens.main([str(tmp_path / "corpus.txt"), "-o", str(tmp_path / "tokens")]) == 0
    overrides = [f"--task={TASK}", f"--task_args.data={tmp_path / 'tokens'}", *TINY_LLAMA]

    task = load_task(TASK, resolve_config(None, overrides))
    model = task.model()
    assert task.obj.shard_units(model) == list(model.model.layers) and len(model.model.layers) == 2
    assert model.config.vocab_size == 256

    results = run_ranks(train_in_rank, 2, [*overrides, f"--run_dir={tmp_path / 'run'}", "--train.batch_size=8",
                                           "--train.max_steps=12", "--train.lr=0.003", "--log.every_steps=4"])
    summary = results[0]["summary"]
    assert summary["global_step"] == 12 and summary["world_size"] == 2
    assert summary["train_loss"] < 5.0  # ln(256) = 5.5 at the start
    assert set(results[0]["state"]) == set(model.state_dict())


def test_the_example_as_shipped_trains_on_the_bundled_text(tmp_path):
    """examples/hf_causal_lm.yaml needs no corpus and no GPU: its defaults learn on this machine."""
    from distributed_train import distributed
    from distributed_train.cli.train import resolve_config
    from distributed_train.training.run import run_training

    config = resolve_config(str(REPO / "examples" / "hf_causal_lm.yaml"), [
        "--train.max_steps=40", "--train.warmup_steps=5", "--eval.every_steps=0", "--checkpoint.every_steps=0",
        "--log.wandb=disabled", f"--run_dir={tmp_path / 'run'}"])
    assert "data" not in config.task_args and "train" not in config.task_args
    summary = run_training(config, distributed.DistEnv())
    assert summary["global_step"] == 40 and summary["train_loss"] < 3.5  # ln(256) = 5.5 at the start


def test_the_bundled_text_file_is_written_once_atomically_and_reused(tmp_path, monkeypatch):
    """One file named after its content in the temporary directory, the same path for every rank
    and run, and nothing else beside it."""
    import gzip
    import importlib.util
    import os
    import tempfile

    import numpy as np

    from distributed_train.tasks.charlm import TEXT_PATH

    spec = importlib.util.spec_from_file_location("hf_example", REPO / "examples" / "hf_causal_lm.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = example.bundled_text_as_bytes()
    mtime = os.stat(first).st_mtime_ns
    assert example.bundled_text_as_bytes() == first and os.stat(first).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.rsplit("/", 1)[-1]]
    expected = np.frombuffer(gzip.decompress(TEXT_PATH.read_bytes()), dtype=np.uint8).astype(np.uint16)
    assert np.array_equal(np.load(first, mmap_mode="r"), expected)
