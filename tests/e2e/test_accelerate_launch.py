"""engine=accelerate through every launcher: `dtrain launch`, `torchrun launcher/train.py` and
`accelerate launch --multi_gpu` on CPU (two processes that Accelerate alone would leave unsynced)
all run a real 2-rank job that ends on the parameters of `dtrain launch --engine=ddp`."""

import json

import pytest
import torch

from tests.helpers import EXACT, FP64, REPO, accelerate_launch, clean_env, dtrain, max_diff, torchrun

pytestmark = pytest.mark.slow

# In float64: every launcher's result is compared with engine=ddp's (helpers.EXACT).
JOB = [FP64, "--task=digits", "--task_args.hidden=32", "--train.batch_size=32", "--train.micro_batch_size=8",
       "--train.max_steps=4", "--train.lr=0.01", "--seed=2", "--log.every_steps=2", "--log.wandb=disabled"]
LAUNCHER = str(REPO / "launcher" / "train.py")


def _result(run_dir) -> tuple[dict, dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, torch.load(run_dir / "final_model.pt", weights_only=True)


def test_every_launcher_runs_two_synced_ranks_like_ddp(tmp_path):
    # No user accelerate config file, and no ACCELERATE_USE_CPU: the engine must handle CPU itself.
    env = clean_env(HF_HOME=str(tmp_path / "hf"))
    env.pop("ACCELERATE_USE_CPU", None)
    dtrain("launch", "--nproc-per-node", "2", *JOB, f"--run_dir={tmp_path / 'ddp'}", env=env)
    dtrain("launch", "--nproc-per-node", "2", *JOB, "--engine=accelerate",
           f"--run_dir={tmp_path / 'dtrain'}", env=env)
    torchrun("--standalone", "--nproc-per-node", "2", LAUNCHER, *JOB, "--engine=accelerate",
             f"--run_dir={tmp_path / 'torchrun'}", env={**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    accelerate_launch(LAUNCHER, *JOB, "--engine=accelerate", f"--run_dir={tmp_path / 'accelerate'}",
                      tmp=tmp_path, env=env)

    reference, ref_state = _result(tmp_path / "ddp")
    for launcher in ("dtrain", "torchrun", "accelerate"):
        summary, state = _result(tmp_path / launcher)
        assert summary["world_size"] == 2 and summary["global_step"] == 4, launcher
        assert summary["train_loss"] == pytest.approx(reference["train_loss"], rel=EXACT), launcher
        assert summary["eval"] == pytest.approx(reference["eval"], rel=EXACT), launcher
        worst = max_diff(state, ref_state)
        assert worst <= EXACT, f"{launcher}: parameters differ from engine=ddp by {worst:.2e}"
        config = (tmp_path / launcher / "config.yaml").read_text()
        assert "engine: accelerate" in config, launcher
