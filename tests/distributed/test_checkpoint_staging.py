"""What a save stalls for: each rank stages only what it writes (ddp's replicated state divided
among the ranks, fsdp's own shards), into host buffers reused from one save to the next, and the
checksums of the commit record come from the writers, not from reading the checkpoint back."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from distributed_train.training.checkpoints import commit, staging
from tests.helpers import REPO, fresh_port, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed


def _model_and_adamw() -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    weights, optimizer_state = get_state_dict(model, optimizer)
    return {"model": weights, "optimizer": optimizer_state}


def _leaves(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,): value})
    return out


def _tensor_bytes(tree: dict) -> int:
    from torch.distributed.tensor import DTensor

    tensors = [v.to_local() if isinstance(v, DTensor) else v for v in _leaves(tree).values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_ranks_divide_the_replicated_tensors_once_and_evenly_and_keep_everything_else(world_size):
    state = _model_and_adamw()
    leaves = _leaves(state)
    tensors = {path for path, value in leaves.items() if isinstance(value, torch.Tensor)}
    shares = [_leaves(staging.my_share(state, rank, world_size)) for rank in range(world_size)]
    owners = {path: [rank for rank, share in enumerate(shares) if path in share] for path in tensors}
    assert all(len(ranks) == 1 for ranks in owners.values()), owners  # each tensor staged by one rank
    for share in shares:  # the param groups (not tensors) stay everywhere; DCP writes them once
        assert {path for path in leaves if path not in tensors} <= set(share)
        assert all(share[path] is leaves[path] for path in share)  # no copy is made here
    loads = [_tensor_bytes({"_": {"/".join(map(str, p)): v for p, v in share.items()}}) for share in shares]
    largest = max(value.numel() * value.element_size() for path, value in leaves.items() if path in tensors)
    assert sum(loads) == _tensor_bytes(state) and max(loads) - min(loads) <= largest
    assert shares == [_leaves(staging.my_share(state, rank, world_size)) for rank in range(world_size)]


def test_the_host_buffers_are_reused_from_one_save_to_the_next():
    state = _model_and_adamw()
    stager = staging.Stager()
    first = stager.stage(state)
    pointer = first["model"]["0.weight"].data_ptr()
    with torch.no_grad():
        state["model"]["0.weight"].add_(1.0)  # training went on
    second = stager.stage(state)
    assert second["model"]["0.weight"].data_ptr() == pointer  # the same host memory
    assert torch.equal(second["model"]["0.weight"], state["model"]["0.weight"])  # with today's values
    assert second["model"]["0.weight"].data_ptr() != state["model"]["0.weight"].data_ptr()  # a copy


def test_the_writer_hashes_every_file_while_writing_it(tmp_path):
    import torch.distributed.checkpoint as dcp

    writer = staging.hashing_writer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(_model_and_adamw(), storage_writer=writer, no_dist=True)
    on_disk = {path.name for path in tmp_path.iterdir()}
    assert set(writer.facts) == on_disk and ".metadata" in on_disk, (writer.facts, on_disk)
    for name, facts in writer.facts.items():
        data = (tmp_path / name).read_bytes()
        assert facts == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def _watched_job(rank: int, world_size: int, tmp: str, engine: str) -> dict:
    """A training job that records what each save staged (bytes) and which files were hashed by
    reading them back."""
    staged, reread = [], []
    stage, sha256 = staging.Stager.stage, commit.sha256

    def recording_stage(self, state):
        staged.append(_tensor_bytes(state))
        return stage(self, state)

    def recording_sha256(path):
        reread.append(Path(path).name)
        return sha256(path)

    staging.Stager.stage, commit.sha256 = recording_stage, recording_sha256
    import os

    os.environ["MASTER_PORT"] = str(fresh_port(rank, Path(tmp), engine))
    train_in_rank(rank, world_size, [f"--task={REPO / 'tests' / 'tasks' / 'toy.py'}:Regression",
                                     f"--engine={engine}", "--train.batch_size=8", "--train.max_steps=12",
                                     "--checkpoint.every_steps=4", "--eval.every_steps=0",
                                     f"--run_dir={tmp}/{engine}"])
    return {"staged": staged, "reread": reread}


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_each_rank_stages_its_share_and_nothing_is_read_back(tmp_path, engine):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ranks = run_ranks(_watched_job, 2, str(tmp_path), engine)
    run_dir = tmp_path / engine
    checkpoints = commit.committed_checkpoints(run_dir / "checkpoints")
    assert [path.name for path in checkpoints] == ["step-00000008", "step-00000012"]  # keep_last 2 of 3
    metadata = FileSystemReader(str(checkpoints[-1])).read_metadata()
    one_copy = sum(item.size.numel() * item.properties.dtype.itemsize
                   for item in metadata.state_dict_metadata.values() if isinstance(item, TensorStorageMetadata))
    for save in range(3):  # at 4, 8, 12: the two ranks' shares make one copy of the state
        shares = [rank["staged"][save] for rank in ranks]
        assert sum(shares) == one_copy and max(shares) < 0.75 * one_copy, (shares, one_copy)
    # The commit records came from the writers: only rank 0's train_state.pt was hashed by reading it.
    assert set(ranks[0]["reread"]) == {commit.TRAIN_STATE} and ranks[1]["reread"] == []
    for path in checkpoints:  # and they are right
        assert commit.verify(path) is None
        record = json.loads((path / commit.MARKER).read_text())
        assert {name for name in record["files"] if name.endswith(".distcp")} >= {"__0_0.distcp", "__1_0.distcp"}
    saves = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saves = [event for event in saves if event.get("kind") == "checkpoint"]
    assert len(saves) == 3 and all(event["stall_s"] > 0 and event["wait_s"] >= 0 for event in saves)
