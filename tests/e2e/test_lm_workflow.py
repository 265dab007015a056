"""The language-model workflow end to end: text -> `dtrain prepare-tokens` -> `dtrain launch lm`
on 2 ranks, stopped, resumed on 1 rank: equal to an uninterrupted run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed_train.cli import main as cli_main
from distributed_train.cli import prepare_tokens
from distributed_train.tasks.charlm import load_text
from tests.helpers import EXACT, FP64, clean_env, dtrain, max_diff
from tests.unit.test_prepare_tokens import read_split

pytestmark = pytest.mark.slow

MODEL = ["--task_args.n_layer=1", "--task_args.n_head=2", "--task_args.d_model=32", "--task_args.seq_len=32"]
# In float64: 2 ranks then 1 are compared with one uninterrupted process (helpers.EXACT).
TRAIN = [FP64, "--train.batch_size=8", "--checkpoint.every_steps=4", "--log.every_steps=2", "--log.wandb=disabled",
         "--eval.max_samples=40"]


def test_prepare_tokens_then_launch_lm_and_resume_on_another_world_size(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(load_text()[:200_000])
    data = tmp_path / "tokens"
    dtrain("prepare-tokens", str(text), "-o", str(data), "--val-fraction", "0.05", timeout=60)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == len(text.read_bytes())
    common = ["lm", f"--task_args.data={data}", *MODEL, *TRAIN]

    # The uninterrupted reference runs beside the first part of the interrupted run.
    reference = subprocess.Popen([sys.executable, "-m", "distributed_train", "train", *common,
                                  "--train.max_steps=8", f"--run_dir={tmp_path / 'ref'}"],
                                 env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    dtrain("launch", "--nproc-per-node", "2", *common, "--train.max_steps=4", f"--run_dir={run}", timeout=180)
    out, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err
    resumed = dtrain("train", *common, "--train.max_steps=8", f"--run_dir={run}", timeout=180)
    assert "resuming from" in resumed.stderr

    summary = json.loads((run / "summary.json").read_text())
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["resumed_from"].endswith("step-00000004")
    assert summary["eval"]["loss"] == pytest.approx(expected["eval"]["loss"], rel=EXACT)
    a = torch.load(run / "final_model.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "final_model.pt", weights_only=True)
    assert max_diff(a, b) <= EXACT


def test_hugging_face_tokenizer_in_worker_processes_equals_one_encode(tmp_path, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is not installed")
    words = [f"w{i}" for i in range(300)]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(400)]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(prepare_tokens, "CHUNK_BYTES", 2048)
    out = tmp_path / "tokens"
    assert cli_main(["prepare-tokens", str(tmp_path / "t.txt"), "-o", str(out), "--tokenizer",
                   str(tmp_path / "tokenizer.json"), "--workers", "2", "--val-fraction", "0"]) == 0
    meta, ids = read_split(out, "train")
    assert meta["vocab_size"] == 301 and meta["tokenizer"]["kind"] == "huggingface"
    assert ids.tolist() == tokenizer.encode((tmp_path / "t.txt").read_text()).ids
