"""`dtrain slurm` without a cluster: the batch script it writes (valid bash, every asked-for
#SBATCH line, the pre-time-limit signal, the requeue after a stop) and one line, exit 2, for each
bad value or a missing sbatch. The script on a real cluster: tests/e2e (with the Slurm fixture)."""

import os
import subprocess

import pytest

from distributed_train import cli
from distributed_train.cli import slurm


def _script(*args: str) -> str:
    ours, train = slurm.split_args(list(args))
    options = slurm._parser().parse_args(ours)
    slurm.check(options)
    config_path, overrides, run_dir = slurm.resolve(train, options.signal_before)
    return slurm.script(options, config_path, overrides, run_dir, list(args))


def test_the_script_asks_for_nodes_time_and_a_signal_and_runs_one_launch_per_node(tmp_path):
    text = _script("--nodes", "4", "--gpus-per-node", "8", "--time", "1-00:00:00", "--partition", "gpu",
                   "--account", "ml", "--qos", "high", "--job-name", "llm", "--signal-before", "300",
                   "--sbatch=--exclusive", "examples/charlm_tiny.yaml", "--checkpoint.every_steps=100",
                   "--run_dir=/shared/runs/llm")
    sbatch = [line.split("  #")[0] for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert sbatch == ["#SBATCH --job-name=llm", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --cpus-per-task=64", "#SBATCH --gpus-per-node=8", "#SBATCH --time=1-00:00:00",
                      "#SBATCH --partition=gpu", "#SBATCH --account=ml", "#SBATCH --qos=high",
                      f"#SBATCH --chdir={os.getcwd()}", "#SBATCH --output=slurm-%x-%j.out",
                      "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
                      "#SBATCH --exclusive"]
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    # torchrun kills the workers 10 s before the time limit; a stop checkpoint may take 5 s less
    assert srun.endswith(" launch --shutdown-timeout 290 examples/charlm_tiny.yaml --checkpoint.grace_s=285 "
                         "--checkpoint.every_steps=100 --run_dir=\"$RUN_DIR\" &")
    assert "RUN_DIR=/shared/runs/llm" in text and "--nproc-per-node" not in srun  # one worker per GPU
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "trap stop USR1 TERM" in text
    (tmp_path / "job.sh").write_text(text)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0


def test_cpu_nodes_a_container_and_no_requeue():
    text = _script("--nodes", "2", "--procs-per-node", "3", "--container-image", "nvcr.io/x/dtrain:1",
                   "--no-requeue", "digits")
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--container-image=nvcr.io/x/dtrain:1" in srun
    assert " dtrain launch --nproc-per-node 3 --shutdown-timeout 110 --checkpoint.grace_s=105 --task=digits " in srun
    assert "#SBATCH --cpus-per-task=3" in text and "--gpus-per-node" not in text
    assert "--requeue" not in text and "scontrol requeue" not in text
    assert "RUN_DIR=runs/dtrain" in text  # runs/JOB_NAME: the same folder for every requeue of the job


@pytest.mark.parametrize("args, flag", [
    (["--nodes", "0"], "--nodes"),
    (["--gpus-per-node", "-1"], "--gpus-per-node"),
    (["--time", "4h"], "--time"),
    (["--partition", "gpu big"], "--partition"),
    (["--job-name", "a;b"], "--job-name"),
    (["--signal-before", "5"], "--signal-before"),
    (["--signal-before", "30", "--checkpoint.grace_s=20"], "checkpoint.grace_s"),  # 15 s fit
    (["--sbatch", "exclusive"], "--sbatch"),
    (["--output", "a\nb"], "--output"),
    (["--train.lr=-1"], "train.lr"),
    (["--nodes", "two"], "--nodes"),
])
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(args, flag, capsys):
    try:
        code = cli.main(["slurm", *args, "digits"])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured
    lines = [line for line in captured.err.splitlines() if not line.startswith("dtrain slurm: warning")]
    assert len(lines) == 1 and lines[0].startswith("dtrain: error:") and flag in lines[0], captured.err


def test_submit_without_sbatch_is_one_line(tmp_path):
    from tests.helpers import REPO, clean_env, dtrain

    proc = dtrain("slurm", "--submit", "digits", "--checkpoint.every_steps=10", cwd=REPO, check=False, timeout=60,
                  env={**clean_env(), "PATH": str(tmp_path)})  # no sbatch on PATH
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("dtrain: error: sbatch not found: run on a Slurm login node, or without "
                                   "--submit to print the script"), proc.stderr
