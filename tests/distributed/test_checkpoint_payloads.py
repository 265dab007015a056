"""A checkpoint never runs code: a payload planted in any file of a committed checkpoint (its commit
record rewritten to match, as anyone who can write the folder could) is refused in one line by a
resume under every engine and by `dtrain export`, and runs nothing. A checkpoint of another model
is one line too."""

import dataclasses
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_ranks

pytestmark = pytest.mark.distributed

TOY = f"--task={REPO / 'tests' / 'tasks' / 'toy.py'}:Regression"
JOB = [TOY, "--train.batch_size=8", "--log.every_steps=2", "--eval.every_steps=0", "--log.wandb=disabled"]
PLANTED = ("metadata", "distcp entry", "train_state")


class Payload:
    """Unpickling it creates the folder `marker`: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(checkpoint: Path, where: str, marker: str) -> None:
    """Put a Payload into one file of `checkpoint`, then re-commit it so its record matches."""
    from distributed_train.training.checkpoints import commit

    if where == "metadata":
        (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    elif where == "train_state":
        torch.save({"payload": Payload(marker)}, checkpoint / commit.TRAIN_STATE)
    else:  # a non-tensor entry of a .distcp file (a param_groups value), offsets rewritten to match
        with open(checkpoint / ".metadata", "rb") as f:
            metadata = pickle.load(f)  # the test's own, trusted checkpoint
        target = next(index for index in metadata.storage_data if index.fqn.startswith("optimizer.param_groups"))
        info = metadata.storage_data[target]
        shard = checkpoint / info.relative_path
        data = shard.read_bytes()
        saved = io.BytesIO()
        torch.save(Payload(marker), saved)
        blob = saved.getvalue()
        shard.write_bytes(data[:info.offset] + blob + data[info.offset + info.length:])
        shift = len(blob) - info.length
        for index, other in metadata.storage_data.items():
            if other.relative_path == info.relative_path and other.offset > info.offset:
                metadata.storage_data[index] = dataclasses.replace(other, offset=other.offset + shift)
        metadata.storage_data[target] = dataclasses.replace(info, length=len(blob))
        with open(checkpoint / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
    (checkpoint / commit.MARKER).unlink()
    commit._commit(checkpoint, int(checkpoint.name.removeprefix("step-")))


def payload_job(rank: int, world_size: int, tmp: str) -> dict:
    """Train 2 steps with a checkpoint; then, per planted file: resume under each engine and export."""
    from distributed_train import distributed
    from distributed_train.cli import export
    from distributed_train.cli.train import resolve_config
    from distributed_train.errors import UsageError
    from distributed_train.training.run import run_training

    tmp = Path(tmp)
    run_training(resolve_config(None, [*JOB, "--train.max_steps=2", "--checkpoint.every_steps=2",
                                       f"--run_dir={tmp / 'run'}"]), distributed.read_env())
    original = tmp / "run" / "checkpoints" / "step-00000002"
    out = {}
    for where in (None, *PLANTED):
        checkpoint = tmp / f"planted-{where}" / "step-00000002"
        shutil.copytree(original, checkpoint)
        marker = tmp / f"ran-{where}"
        if where:
            plant(checkpoint, where, str(marker))
        for engine in ("ddp", "fsdp", "accelerate", "export"):
            try:
                if engine == "export":
                    export.main([str(checkpoint), "-o", str(tmp / f"export-{where}.pt")])
                else:
                    run_training(resolve_config(None, [*JOB, "--train.max_steps=3", f"--engine={engine}",
                                                       f"--checkpoint.resume={checkpoint}",
                                                       f"--run_dir={tmp / f'resume-{where}-{engine}'}"]),
                                 distributed.read_env())
                out[where, engine] = "ok"
            except UsageError as exc:
                out[where, engine] = str(exc)
            out[where, engine, "ran"] = marker.exists()
    for engine in ("ddp", "fsdp"):  # another model (a BatchNorm layer more): one line, not a traceback
        try:
            run_training(resolve_config(None, [*JOB, "--train.max_steps=3", f"--engine={engine}",
                                               f"--task={REPO / 'tests' / 'tasks' / 'toy.py'}:BatchNormRegression",
                                               "--checkpoint.allow_changes=true", f"--checkpoint.resume={original}",
                                               f"--run_dir={tmp / f'other-model-{engine}'}"]), distributed.read_env())
            out["other model", engine] = "ok"
        except UsageError as exc:
            out["other model", engine] = str(exc)
    return out


def test_a_payload_in_any_checkpoint_file_is_refused_in_one_line_and_runs_nothing(tmp_path):
    (out,) = run_ranks(payload_job, 1, str(tmp_path), timeout=240)
    engines = ("ddp", "fsdp", "accelerate", "export")
    assert all(out[None, engine] == "ok" for engine in engines), out  # the untouched copy loads
    for where in PLANTED:
        for engine in engines:
            assert not out[where, engine, "ran"], f"a payload in the {where} ran under {engine}"
            message = out[where, engine]
            if engine == "export" and where != "metadata":
                continue  # export reads only the model's tensors: it never opens those entries
            assert message != "ok" and "\n" not in message, (where, engine, message)
            assert "refused" in message and "step-00000002" in message, (where, engine, message)
            assert "weights_only=False" not in message and "posix.mkdir" in message, message
    for engine in ("ddp", "fsdp"):
        message = out["other model", engine]
        assert "does not fit this model" in message and "\n" not in message, message
