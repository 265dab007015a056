"""Samplers and loaders without a process group: every rank's sampler is built in one process."""

from collections import namedtuple
from types import MappingProxyType

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

from distributed_train.batches import BatchPlan, batch_len, move_to_device
from distributed_train.errors import UsageError
from distributed_train.training import data
from distributed_train.training.data import (
    EvalBatchSampler,
    FeistelPermutation,
    TrainBatchSampler,
    epoch_order,
    epoch_permutation,
    eval_shard,
    make_loader,
    steps_per_epoch,
)
from tests.tasks.third_party import Encoding  # the shape of transformers' BatchEncoding: a UserDict


@pytest.fixture(params=["randperm", "feistel"])
def order_kind(request, monkeypatch):
    """Run a test with each kind of epoch order: randperm, and the per-position permutation big
    datasets get (forced here on small ones)."""
    if request.param == "feistel":
        monkeypatch.setattr(data, "RANDPERM_MAX", 0)
    return request.param


def rank_steps(n, plan, seed, epoch=0, start_step=0):
    """For each rank, its micro-batches grouped into optimizer steps."""
    per_rank = []
    for rank in range(plan.world_size):
        sampler = TrainBatchSampler(n, plan, rank, seed)
        sampler.set_position(epoch, start_step)
        micro = list(sampler)
        assert len(micro) == len(sampler)
        assert all(len(m) == plan.micro_batch for m in micro)
        k = plan.accumulation_steps
        per_rank.append([sum(micro[i:i + k], []) for i in range(0, len(micro), k)])
    return per_rank


@pytest.mark.parametrize("world_size, micro_batch", [(1, None), (2, None), (3, None), (4, None),
                                                     (1, 3), (2, 2), (3, 4), (4, 1), (2, 6)])
def test_each_step_is_a_partition_of_the_same_global_batch(world_size, micro_batch, order_kind):
    n, B, seed = 101, 24, 7
    plan = BatchPlan.make(B, world_size, micro_batch)
    assert plan.world_size * plan.micro_batch * plan.accumulation_steps == B
    for epoch in (0, 1):
        order = epoch_permutation(n, seed, epoch)
        per_rank = rank_steps(n, plan, seed, epoch)
        assert all(len(steps) == n // B for steps in per_rank)
        for s in range(n // B):
            shares = [steps[s] for steps in per_rank]
            union = sorted(i for share in shares for i in share)
            assert union == sorted(order[s * B:(s + 1) * B])  # same samples as one process
            assert len(set(union)) == B  # no rank repeats another's sample


def test_permutation_depends_only_on_seed_and_epoch(order_kind):
    assert epoch_permutation(50, 3, 2) == epoch_permutation(50, 3, 2)
    assert sorted(epoch_permutation(50, 3, 2)) == list(range(50))
    assert epoch_permutation(50, 3, 2) != epoch_permutation(50, 3, 1)
    assert epoch_permutation(50, 3, 2) != epoch_permutation(50, 4, 2)
    assert epoch_permutation(50, 3, 0) != list(range(50))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_feistel_order_is_a_permutation_and_any_slice_of_it_agrees(n):
    perm = FeistelPermutation(n, seed=11)
    full = perm[0:n].tolist()
    assert sorted(full) == list(range(n))
    assert perm[1:n:3].tolist() == full[1::3] and perm[n // 2:n].tolist() == full[n // 2:]
    assert FeistelPermutation(n, seed=11)[0:n].tolist() == full  # a function of (n, seed) only
    if n >= 16:
        assert full != list(range(n)) and FeistelPermutation(n, seed=12)[0:n].tolist() != full


def test_a_corpus_of_billions_of_windows_costs_nothing_up_front():
    n = 4 * 10**10  # far beyond RAM as a randperm (160 GB)
    order = epoch_order(n, seed=0, epoch=3)
    assert isinstance(order, FeistelPermutation) and len(order) == n
    batch = order[10**9:10**9 + 4096:2]  # one rank's share of one step
    assert batch.dtype == torch.int64 and len(batch) == 2048 and len(set(batch.tolist())) == 2048
    assert 0 <= batch.min() and batch.max() < n
    assert isinstance(epoch_order(data.RANDPERM_MAX, 0, 0), torch.Tensor)  # randperm up to the limit


def test_set_position_resumes_exactly_where_the_full_epoch_would_be(order_kind):
    n, seed = 100, 1
    for world_size, micro in [(1, None), (2, 3), (4, None)]:
        plan = BatchPlan.make(12, world_size, micro)
        full = rank_steps(n, plan, seed, epoch=3)
        for start in (0, 1, 5, 8):
            resumed = rank_steps(n, plan, seed, epoch=3, start_step=start)
            assert resumed == [steps[start:] for steps in full]
    sampler = TrainBatchSampler(n, BatchPlan.make(12, 1, None), 0, seed)
    with pytest.raises(ValueError):
        sampler.set_position(0, 9)


def test_resume_on_another_world_size_continues_the_same_samples():
    n, seed, start = 100, 5, 3
    one = rank_steps(n, BatchPlan.make(12, 1, None), seed, epoch=1, start_step=start)[0]
    four = rank_steps(n, BatchPlan.make(12, 4, 1), seed, epoch=1, start_step=start)
    for s, step in enumerate(one):
        assert sorted(step) == sorted(i for steps in four for i in steps[s])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 10, 50, 97])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_eval_shards_cover_every_index_exactly_once(n, world_size):
    shards = [eval_shard(n, r, world_size) for r in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(n))
    for batch_size in (1, 3, 8):
        batches = [EvalBatchSampler(n, r, world_size, batch_size) for r in range(world_size)]
        seen = [i for sampler in batches for batch in sampler for i in batch]
        assert seen == list(range(n))
        assert all(0 < len(b) <= batch_size for sampler in batches for b in sampler)
        assert all(len(list(sampler)) == len(sampler) for sampler in batches)


@pytest.mark.parametrize("global_batch, world_size, micro, needle", [
    (10, 3, None, "divisible by the world size"),
    (12, 2, 4, r"world size x train\.micro_batch_size \(2 x 4\)"),
    (3, 2, None, "divisible by the world size"),
])
def test_batch_plan_errors_name_the_keys(global_batch, world_size, micro, needle):
    with pytest.raises(UsageError, match=needle):
        BatchPlan.make(global_batch, world_size, micro)


def test_batch_plan_and_steps_per_epoch():
    assert BatchPlan.make(24, 2, 4) == BatchPlan(24, 2, 4, 3)
    assert BatchPlan.make(24, 3, None) == BatchPlan(24, 3, 8, 1)
    assert steps_per_epoch(100, 24) == 4
    with pytest.raises(UsageError, match=r"train\.batch_size \(64\) is larger than the training set \(10 samples\)"):
        steps_per_epoch(10, 64)
    with pytest.raises(UsageError, match=r"larger than the training set \(1 sample\)$"):
        steps_per_epoch(1, 2)


class BatchedDataset(torch.utils.data.Dataset):
    """A dataset that can fetch a whole batch at once (and counts how it was asked)."""

    def __init__(self, n):
        self.x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
        self.y = torch.arange(n) % 4
        self.batch_calls = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}

    def get_batch(self, indices):
        self.batch_calls += 1
        return {"x": self.x[indices], "y": self.y[indices]}


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        if isinstance(b, dict):
            assert a.keys() == b.keys()
            a, b = list(a.values()), list(b.values())
        assert len(a) == len(b)
        for ta, tb in zip(a, b):
            assert ta.dtype == tb.dtype and torch.equal(ta, tb)


@pytest.mark.parametrize("make", [
    lambda: TensorDataset(torch.randn(30, 2, generator=torch.Generator().manual_seed(0)), torch.arange(30)),
    lambda: BatchedDataset(30),
    lambda: Subset(TensorDataset(torch.arange(90).reshape(45, 2), torch.arange(45)), list(range(44, 14, -1))),
])
def test_batched_fetch_equals_per_sample_collate(make):
    dataset = make()
    sampler = TrainBatchSampler(30, BatchPlan.make(8, 2, 2), rank=1, seed=3)
    fast = list(make_loader(dataset, sampler, None, num_workers=0, pin_memory=False, seed=0))
    slow = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=default_collate))
    assert_same_batches(fast, slow)
    if isinstance(dataset, BatchedDataset):
        assert dataset.batch_calls == len(fast)  # one call per batch, not per sample


def test_user_collate_wins_over_get_batch():
    dataset = BatchedDataset(10)
    sampler = EvalBatchSampler(10, 0, 1, 4)
    batches = list(make_loader(dataset, sampler, lambda samples: len(samples), 0, False, 0))
    assert batches == [4, 4, 2] and dataset.batch_calls == 0


Pair = namedtuple("Pair", "inputs target")


def test_move_to_device_keeps_structure():
    device = torch.device("meta")
    batch = {"a": (torch.ones(2), [torch.zeros(2, 3), "label"]), "b": Pair(torch.ones(1), torch.ones(1)),
             "n": 3}
    moved = move_to_device(batch, device)
    assert moved.keys() == batch.keys() and moved["n"] == 3
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].shape == (2, 3)
    assert moved["a"][1][1] == "label"
    assert isinstance(moved["b"], Pair) and moved["b"].target.device.type == "meta"
    assert move_to_device(torch.ones(2), device).device.type == "meta"


class Graphs:
    """A graph library's batch: not a container, moved by its own .to()."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def to(self, device):
        return Graphs(self.x.to(device))


def test_move_to_device_keeps_mappings_that_are_not_dicts_and_moves_objects_with_to():
    device = torch.device("meta")
    moved = move_to_device({"enc": Encoding(ids=torch.ones(2, 3), text=["a", "b"]), "g": Graphs(torch.ones(2))},
                           device, float_dtype=torch.float64)
    assert type(moved["enc"]) is Encoding and moved["enc"]["ids"].device.type == "meta"
    assert moved["enc"]["ids"].dtype == torch.float64 and moved["enc"]["text"] == ["a", "b"]
    assert isinstance(moved["g"], Graphs) and moved["g"].x.device.type == "meta"
    proxy = MappingProxyType({"x": torch.ones(1)})  # a mapping that cannot be copied: a dict back
    assert move_to_device(proxy, device)["x"].device.type == "meta"


def test_move_to_device_keeps_transformers_batch_encoding():
    transformers = pytest.importorskip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    moved = move_to_device(encoding, torch.device("meta"))
    assert isinstance(moved, transformers.BatchEncoding) and moved.input_ids.device.type == "meta"
    assert batch_len(encoding) == 2


def test_batch_len():
    assert batch_len(torch.zeros(5, 2)) == 5
    assert batch_len({"x": torch.zeros(3), "y": torch.zeros(3)}) == 3
    assert batch_len((torch.zeros(4, 1), torch.zeros(4))) == 4
    # Strings, as default_collate gathers them, before or without a tensor; a scalar is no batch size.
    assert batch_len({"text": ["a", "b", "c"], "label": torch.zeros(3)}) == 3
    assert batch_len((torch.tensor(0.5), ["a", "b"])) == 2
    assert batch_len(Encoding(weight=torch.tensor(1.0), ids=torch.zeros(6, 2))) == 6
    for batch in ("text", {"n": 3}, (torch.tensor(1.0),), []):
        with pytest.raises(UsageError, match=r"cannot tell how many samples .* metrics\(model, batch\)"):
            batch_len(batch)

