"""The object collectives (rank 0's run folder, the rng states of a save, the stop-save decision,
evaluation problems) are checked like the reductions: a payload an aborted NCCL group left behind
(error handling 2 leaves the receive buffer as it was, with no error) is a CommunicationFailure,
never a stale rng state in a checkpoint or another rank's old answer."""

import pytest
import torch

from distributed_train.training.checkpoints.commit import committed_checkpoints
from tests.helpers import run_ranks, train_in_rank

pytestmark = pytest.mark.distributed


def _aborted_on_rank_1(rank: int, garbage: str, after_calls: int = 0) -> None:
    """From the `after_calls`+1-th object collective on, rank 1 reads what an aborted group leaves:
    the previous call's bytes (the allocator reuses the buffer), zeros, or a torch call that fails
    to unpickle them. The real collective still runs, so no rank waits."""
    import pickle

    from distributed_train.distributed import group

    real = {"broadcast": group.torch_dist.broadcast_object_list, "gather": group.torch_dist.all_gather_object}
    seen: list[bytes] = []

    def spoil(box: list) -> None:
        seen.append(box[-1])
        if rank != 1 or len(seen) <= after_calls:
            return
        if garbage == "stale":
            box[-1] = seen[-2]
        elif garbage == "zeros":
            box[-1] = bytes(len(box[-1]))
        else:
            raise pickle.UnpicklingError("invalid load key, '\\x00'.")

    def broadcast(box: list, src: int = 0) -> None:
        real["broadcast"](box, src=src)
        spoil(box)

    def gather(out: list, obj: object) -> None:
        real["gather"](out, obj)
        spoil(out)

    group.torch_dist.broadcast_object_list = broadcast
    group.torch_dist.all_gather_object = gather


def _collect(rank: int, world_size: int, garbage: str) -> dict:
    from distributed_train import distributed
    from distributed_train.errors import CommunicationFailure

    torch.distributed.init_process_group("gloo")
    _aborted_on_rank_1(rank, garbage, after_calls=2)
    fine = [distributed.broadcast_object({"run_dir": f"/runs/{rank}"}),
            distributed.all_gather_object(rank * 10)]
    found = {"fine": fine}
    for name, call in (("broadcast", lambda: distributed.broadcast_object(f"answer of rank {rank}")),
                       ("gather", lambda: distributed.all_gather_object(rank * 100))):
        try:
            found[name] = call()
        except CommunicationFailure as exc:
            found[name] = {"exit_code": exc.exit_code, "error": str(exc)}
    torch.distributed.destroy_process_group()
    return found


@pytest.mark.parametrize("garbage", ["stale", "zeros", "unpickling"])
def test_an_object_collective_read_after_the_group_was_aborted_is_a_communication_failure(garbage):
    first, second = run_ranks(_collect, 2, garbage)
    for found in (first, second):
        assert found["fine"] == [{"run_dir": "/runs/0"}, [0, 10]], found
    assert first["broadcast"] == "answer of rank 0" and first["gather"] == [0, 100], first
    for name in ("broadcast", "gather"):
        failure = second[name]
        assert isinstance(failure, dict) and failure["exit_code"] == 4, second
        op = {"broadcast": "broadcast_object", "gather": "all_gather_object"}[name]
        assert failure["error"].startswith(f"rank 1: the {op} in <lambda>() came back corrupt ("), failure
        detail = {"stale": "it holds object collective 2's data, this is 3" if name == "broadcast" else
                  "it holds object collective 3's data, this is 4",
                  "zeros": "UnpicklingError", "unpickling": "UnpicklingError: invalid load key"}[garbage]
        assert detail in failure["error"], failure


def _train_with_an_aborted_rng_gather(rank: int, world_size: int, overrides: list[str]) -> dict:
    from distributed_train.distributed import diagnose, group
    from distributed_train.errors import CommunicationFailure

    real = group.torch_dist.all_gather_object
    saves: list[list] = []

    def gather(out: list, obj: object, **kwargs) -> None:  # the second save's: rank 0's rng states are stale
        real(out, obj, **kwargs)
        if diagnose.position.phase == "all_gather_object in save()":
            saves.append(list(out))
            if len(saves) == 2:  # the abort hits every rank
                out[0] = saves[0][0]

    group.torch_dist.all_gather_object = gather
    try:
        out = train_in_rank(rank, world_size, overrides)
    except CommunicationFailure as exc:
        return {"exit_code": exc.exit_code, "error": str(exc)}
    return {"summary": out["summary"]}


def test_a_save_whose_rng_gather_came_back_stale_commits_nothing_and_exits_4(tmp_path):
    """Rank 0's rng states in checkpoint 4 would be checkpoint 2's (an exact resume would replay
    the wrong dropout masks and shuffles): a communication failure instead, and no checkpoint 4."""
    overrides = ["--task=tests.tasks.toy:Regression", "--train.batch_size=8", "--train.max_steps=6",
                 "--eval.every_steps=0", "--log.every_steps=100", f"--run_dir={tmp_path}",
                 "--checkpoint.every_steps=2"]
    for rank, result in enumerate(run_ranks(_train_with_an_aborted_rng_gather, 2, overrides)):
        assert result.get("exit_code") == 4, result
        assert result["error"].startswith(f"rank {rank}: the all_gather_object in save() came back corrupt (it "
                                          "holds object collective "), result
    steps = [int(p.name.split("-")[-1]) for p in committed_checkpoints(tmp_path / "checkpoints")]
    assert steps == [2], steps
