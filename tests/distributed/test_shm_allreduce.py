"""The shared-memory gradient all-reduce: exact means on real ranks, the same model as gloo, clear
failures (a peer that exits, a peer that never comes, no room in /dev/shm), and when it stays off."""

import glob
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from distributed_train.config import DDPConfig
from distributed_train.distributed import DistEnv, diagnose, shm_allreduce
from distributed_train.distributed.shm_allreduce import SharedMemoryAllReduce
from distributed_train.errors import UsageError
from tests.helpers import REPO, run_ranks, train_in_rank

TOY = str(REPO / "tests" / "tasks" / "toy.py")


def _leftover_files() -> list[str]:
    return glob.glob(os.path.join(shm_allreduce.SHM_DIR, "dtrain-allreduce-*"))


class SparseEmbeddingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(self.embed(ids)).pow(2).mean()


def reduce_job(rank, world_size):
    """Many reductions of rank-dependent tensors (several dtypes, pieces larger than a slot, random
    skew between ranks); returns what each call gave and what the mean must be."""
    from distributed_train import distributed
    env = distributed.read_env()
    distributed.init(env, "gloo", torch.device("cpu"), timeout_s=60)
    small_slots = shm_allreduce._create_and_open(env, slot_bytes=256, timeout_s=60)  # 64 floats a piece
    # "require": a host where shared memory cannot attach fails here instead of testing nothing.
    sized = shm_allreduce.setup(env, torch.device("cpu"), "require", 4040, timeout_s=60)
    rng = random.Random(rank)
    results = []
    for call in range(40):
        reducer = small_slots if call % 2 else sized
        dtype = [torch.float32, torch.float64, torch.bfloat16][call % 3]
        numel = [1, 63, 64, 65, 1000][call % 5]
        inputs = [torch.randn(numel, generator=torch.Generator().manual_seed(1000 * call + r)).to(dtype)
                  for r in range(world_size)]
        time.sleep(rng.random() * 0.002)  # ranks arrive in a different order every call
        mine = inputs[rank].clone()
        reducer.all_reduce_mean_(mine)
        expected = inputs[0] / world_size
        for r in range(1, world_size):  # the documented order: rank 0 + rank 1 + ...
            expected = expected + inputs[r] / world_size
        results.append((mine, expected))
    # A DDP model with a sparse gradient (its own bucket, left to gloo) and dense ones (shared memory).
    torch.manual_seed(0)
    model = SparseEmbeddingModel()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, shm_allreduce.setup(env, torch.device("cpu"), "require", 4 * 45, 60).hook)
    ids = [torch.tensor([r, r + 1, 7]) for r in range(world_size)]
    ddp(ids[rank]).backward()
    grads = {n: p.grad.to_dense().clone() for n, p in model.named_parameters()}
    expected = {n: torch.zeros_like(g) for n, g in grads.items()}
    for r in range(world_size):  # the mean of every rank's gradient, computed here
        model.zero_grad(set_to_none=True)
        model(ids[r]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.to_dense() / world_size
    distributed.barrier()
    return {"results": results, "slot_bytes": sized.slot_bytes, "leftover": _leftover_files(),
            "sparse_model": (grads, expected)}


@pytest.mark.distributed
def test_reductions_are_exact_means_on_every_rank():
    ranks = run_ranks(reduce_job, 3)
    for rank, outcome in enumerate(ranks):
        assert outcome["leftover"] == []  # the file is unlinked once every rank has mapped it
        assert outcome["slot_bytes"] == 4096  # 4040 bytes of gradients, rounded up to 64
        for call, (got, expected) in enumerate(outcome["results"]):
            assert torch.equal(got, expected), f"rank {rank} call {call}: {got[:4]} != {expected[:4]}"
            assert torch.equal(got, ranks[0]["results"][call][0])  # bitwise equal across ranks
        grads, expected = outcome["sparse_model"]
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], msg=f"rank {rank} {name}")


@pytest.mark.distributed
def test_two_rank_training_equals_gloo_bitwise(tmp_path):
    common = [f"--task={TOY}:Regression", "--train.batch_size=24", "--train.max_steps=8", "--seed=5",
              "--train.lr=0.05"]
    # "require", not the default "auto": where shared memory cannot attach, "auto" would quietly
    # compare gloo with gloo.
    shm = run_ranks(train_in_rank, 2, [*common, f"--run_dir={tmp_path / 'shm'}", "--ddp.shm_allreduce=require"])
    gloo = run_ranks(train_in_rank, 2, [*common, f"--run_dir={tmp_path / 'gloo'}", "--ddp.shm_allreduce=never"])
    for name, value in gloo[0]["state"].items():
        assert torch.equal(shm[0]["state"][name], value), name
    assert shm[0]["summary"]["train_loss"] == gloo[0]["summary"]["train_loss"]


def _reducer_with_peer(tmp_path, peer_pid: int, timeout_s: float, rank: int = 0) -> SharedMemoryAllReduce:
    """Rank `rank` of a 2-rank group whose rank 1 is `peer_pid` (no process group needed)."""
    path = tmp_path / "slots"
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(shm_allreduce.file_bytes(2, 256))
    return SharedMemoryAllReduce(str(path), rank=rank, world_size=2, slot_bytes=256,
                                 pids=[os.getpid(), peer_pid], timeout_s=timeout_s)


def test_a_peer_that_leaves_with_an_error_fails_the_reduction_at_once(tmp_path):
    # run_training calls shm_allreduce.leave() when it raises: peers need not wait for the process to end.
    reducer = _reducer_with_peer(tmp_path, os.getpid(), timeout_s=60)
    peer = _reducer_with_peer(tmp_path, os.getpid(), timeout_s=60, rank=1)
    shm_allreduce.leave()  # marks every reducer of this process, so the peer too
    assert list(reducer.sequence) == [-1, -1]  # left after publishing nothing
    # "left the job", not "timed out": the peer's departure ended the wait, not timeout_s=60
    with pytest.raises(RuntimeError, match=r"rank 0 \(pid \d+\) left the job during the shared-memory"):
        peer.all_reduce_mean_(torch.ones(8))


def test_a_peer_that_leaves_after_the_last_barrier_does_not_fail_the_reduction(tmp_path):
    # Rank 1 finished its last barrier and left (e.g. SIGTERM at the end of the step) before rank 0,
    # descheduled, looked at the sequence numbers again: rank 0 must finish, not report a crash.
    reducer = _reducer_with_peer(tmp_path, os.getpid(), timeout_s=60)
    peer = _reducer_with_peer(tmp_path, os.getpid(), timeout_s=60, rank=1)
    peer.calls = 2
    peer.sequence[1] = -(2 + 1)  # what leave() publishes after call 2
    reducer.calls = 1
    reducer._arrive()  # call 2: the peer reached it before leaving
    assert reducer.calls == 2
    reducer.calls = 2
    with pytest.raises(RuntimeError, match="rank 1 .* left the job"):
        reducer._arrive()  # call 3: the peer never came


def test_a_peer_that_exits_fails_the_reduction_quickly(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    reducer = _reducer_with_peer(tmp_path, gone.pid, timeout_s=60)
    with pytest.raises(RuntimeError) as caught:
        reducer.all_reduce_mean_(torch.ones(8))
    # "exited", not "timed out": the peer's death ended the wait, not timeout_s=60
    assert f"rank 1 (pid {gone.pid}) exited during the shared-memory all-reduce" in str(caught.value)
    assert diagnose.is_communication_failure(caught.value)


def test_a_peer_that_never_arrives_times_out_naming_it(tmp_path):
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        reducer = _reducer_with_peer(tmp_path, stuck.pid, timeout_s=0.3)
        with pytest.raises(RuntimeError, match=r"Timed out waiting 0.3 s for rank\(s\) 1 in the shared-memory"):
            reducer.all_reduce_mean_(torch.ones(8))
    finally:
        stuck.kill()
        stuck.wait()


def test_no_room_in_dev_shm_is_a_reason_not_a_crash(tmp_path):
    total = os.statvfs(shm_allreduce.SHM_DIR)
    too_big = 2 * total.f_blocks * total.f_frsize
    path = os.path.join(shm_allreduce.SHM_DIR, "dtrain-allreduce-test-too-big")
    reason = shm_allreduce._create(path, too_big)
    assert reason is not None and "has no room" in reason and "larger /dev/shm" in reason
    assert not os.path.exists(path)


@pytest.mark.parametrize("env, device, expected", [
    (DistEnv(0, 2, 0, 1, "h", 1), "cpu", "more than one host"),
    (DistEnv(0, 2, 0, 2, "h", 1), "cuda", "gradients live on cuda"),
])
def test_where_it_does_not_apply(env, device, expected):
    gradient_bytes = 4 * 6
    # No process group: these reasons are known before any collective.
    assert shm_allreduce.setup(env, torch.device(device), "auto", gradient_bytes, 60) is None
    with pytest.raises(UsageError, match=f"ddp.shm_allreduce=require, but .*{expected}"):
        shm_allreduce.setup(env, torch.device(device), "require", gradient_bytes, 60)
    assert shm_allreduce.setup(DistEnv(0, 2, 0, 2, "h", 1), torch.device("cpu"), "never", gradient_bytes, 60) is None


def test_require_with_a_compression_hook_is_a_usage_error():
    with pytest.raises(UsageError, match="ddp.shm_allreduce=require cannot be combined with ddp.comm_hook=bf16"):
        DDPConfig(comm_hook="bf16", shm_allreduce="require")


def test_a_rank_that_does_not_share_rank_0s_dev_shm_says_so(tmp_path):
    env = DistEnv(1, 2, 1, 2, "h", 1)
    missing = str(tmp_path / "missing")
    reducer, problem = shm_allreduce._open(missing, 5, env, 256, [1, 2], 60)
    assert reducer is None and "rank 1 does not see rank 0's" in problem and not os.path.exists(missing)
    other = tmp_path / "other"
    with open(other, "wb") as f:
        f.truncate(shm_allreduce.file_bytes(2, 256))  # same name, but not rank 0's file: token 0
    alive = [os.getpid(), os.getppid()]
    reducer, problem = shm_allreduce._open(str(other), 5, env, 256, alive, 60)
    assert reducer is None and "maps a different" in problem
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    reducer, problem = shm_allreduce._open(str(other), None, env, 256, [os.getpid(), gone.pid], 60)
    assert reducer is None and f"cannot see the process of rank 1 (pid {gone.pid}" in problem


@pytest.mark.parametrize("world_size", [2, 8, 64, 512])
def test_the_shared_file_stays_within_its_budget_for_a_large_model(world_size):
    slot = shm_allreduce.slot_bytes_for(10**9, world_size)  # a 1 GB model goes through in pieces
    assert slot % shm_allreduce.LINE == 0 and slot <= shm_allreduce.MAX_SLOT_BYTES
    assert shm_allreduce.file_bytes(world_size, slot) <= max(shm_allreduce.SHM_BUDGET_BYTES,
                                                             2 * (world_size + 1) * 64 * 1024) + 64 * (world_size + 1)
    assert shm_allreduce.slot_bytes_for(1000, world_size) == 1024  # a small model fits one slot


def test_other_architectures_keep_gloo(monkeypatch):
    # The ordering argument (slot stores visible before the sequence number) is x86's TSO.
    monkeypatch.setattr(shm_allreduce.platform, "machine", lambda: "aarch64")
    reason = shm_allreduce.unsupported_reason(DistEnv(0, 2, 0, 2, "h", 1), torch.device("cpu"))
    assert reason == "it is only validated on x86_64 (this is aarch64)"
