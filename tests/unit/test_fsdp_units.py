"""Units, activation checkpointing, fsdp settings and the memory rules, without a process group."""

import copy

import pytest
import torch
from torch import nn

from distributed_train.config import load_config
from distributed_train.engines.fsdp import check_settings
from distributed_train.engines.memory import predicted_state_bytes, state_bytes
from distributed_train.engines.units import (
    check_tied_weights,
    checkpoint_units,
    find_units,
)
from distributed_train.errors import UsageError
from distributed_train.task import Task
from distributed_train.tasks.charlm import GPT


class Plain:
    """A task object with no shard_units."""

    def loss(self, model, batch):
        return model(batch).mean()


class Own(Plain):
    def shard_units(self, model):
        return [model.head]


def gpt():
    torch.manual_seed(0)
    return GPT(vocab_size=32, ctx=8, n_layer=3, n_head=2, d_model=16)


def test_units_default_to_the_blocks_of_module_lists_then_config_then_task():
    model = gpt()
    assert find_units(Task(Plain(), "t"), model, []) == list(model.blocks)
    assert find_units(Task(Plain(), "t"), model, ["LayerNorm"])[0] is model.blocks[0].ln1
    assert find_units(Task(Own(), "t"), model, ["Block"]) == [model.head]
    assert find_units(Task(Plain(), "t"), nn.Sequential(nn.Linear(2, 2)), []) == []
    with pytest.raises(UsageError, match="fsdp.units=\\['Conv2d'\\].*Block"):
        find_units(Task(Plain(), "t"), model, ["Conv2d"])


def test_weights_tied_across_units_are_explained():
    model = gpt()
    check_tied_weights(model, list(model.blocks))  # tok_emb and head are both outside every unit: fine
    model.blocks[0].fc.weight = model.blocks[1].fc.weight
    with pytest.raises(UsageError, match="blocks.0.fc.weight and blocks.1.fc.weight are one tied parameter"):
        check_tied_weights(model, list(model.blocks))
    tied = gpt()  # the head shares its weight with tok_emb, which stays outside the unit
    with pytest.raises(UsageError, match="outside every unit"):
        check_tied_weights(tied, [tied.head])


def test_activation_checkpointing_keeps_names_and_gradients():
    plain, recomputed = gpt(), gpt()
    checkpoint_units(recomputed, list(recomputed.blocks))
    assert list(plain.state_dict()) == list(recomputed.state_dict())
    idx = torch.randint(0, 32, (4, 8))
    for model in (plain, recomputed):
        model(idx).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-6, name
    with pytest.raises(UsageError, match="activation_checkpointing=units"):
        checkpoint_units(nn.Linear(2, 2), [])


def test_fsdp_settings_are_checked_with_one_line():
    config = load_config(None, ["--engine=fsdp", "--fsdp.replicate=2", "--fsdp.cpu_offload=true"])
    with pytest.raises(UsageError, match="fsdp.replicate=2 must divide the world size \\(3 ranks\\)"):
        check_settings(config, 3, torch.device("cpu"))
    with pytest.raises(UsageError, match="fsdp.cpu_offload needs CUDA"):
        check_settings(config, 4, torch.device("cpu"))
    with pytest.raises(UsageError, match="need engine=fsdp"):
        load_config(None, ["--fsdp.reshard_after_forward=false"])
    assert load_config(None, ["--fsdp.units=Block,LayerNorm"]).fsdp.units == ["Block", "LayerNorm"]
    with pytest.raises(UsageError, match="train.activation_checkpointing"):
        load_config(None, ["--train.activation_checkpointing=all"])


def test_predicted_state_bytes_match_the_counted_ones_and_shard():
    model = gpt()
    optimizer = torch.optim.AdamW(model.parameters())
    counted = state_bytes(model, optimizer)
    assert counted == predicted_state_bytes(model, 2, 1)
    model(torch.randint(0, 32, (2, 8))).sum().backward()
    optimizer.step()  # the real state, once it exists, is what is counted
    assert state_bytes(model, optimizer) == counted
    meta = copy.deepcopy(model).to("meta")
    sharded = predicted_state_bytes(meta, 2, 4)
    one_row_each = sum(p.numel() // p.shape[0] for p in model.parameters()) * 4 * 4  # dim 0 rounds up
    assert sum(counted.values()) / 4 < sum(sharded.values()) <= sum(counted.values()) / 4 + one_row_each
