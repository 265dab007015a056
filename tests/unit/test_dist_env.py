"""Reading torchrun's environment and choosing the backend, with no process group."""

import pytest
import torch

from distributed_train.distributed import DistEnv, pick_backend, pick_device, read_env
from distributed_train.errors import UsageError

FULL = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}


def test_no_torchrun_variables_is_one_process():
    env = read_env({"PATH": "/bin", "HOME": "/root"})
    assert env == DistEnv() and env.world_size == 1 and env.is_main and not env.is_distributed


def test_full_torchrun_environment():
    env = read_env(FULL)
    assert env == DistEnv(3, 4, 1, 2, "node0", 29400)
    assert env.is_distributed and not env.is_main


def test_local_rank_defaults_to_global_on_one_node():
    env = read_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1234"})
    assert (env.local_rank, env.local_world_size) == (1, 2)


@pytest.mark.parametrize("change, needle", [
    ({"RANK": "x"}, "RANK must be an integer, got 'x'"),
    ({"WORLD_SIZE": ""}, "WORLD_SIZE must be an integer"),
    ({"RANK": "-1"}, "RANK must be >= 0"),
    ({"LOCAL_RANK": "1.5"}, "LOCAL_RANK must be an integer"),
    ({"RANK": "4"}, "RANK=4 must be smaller than WORLD_SIZE=4"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 / LOCAL_WORLD_SIZE=2"),
    ({"LOCAL_WORLD_SIZE": "8"}, "LOCAL_WORLD_SIZE=8"),
    ({"MASTER_ADDR": ""}, "MASTER_ADDR is empty"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT must be an integer"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a TCP port"),
])
def test_garbage_values_name_the_variable(change, needle):
    with pytest.raises(UsageError, match=needle):
        read_env({**FULL, **change})


@pytest.mark.parametrize("present, missing", [
    ({"RANK": "0"}, "WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
    ({"LOCAL_RANK": "0"}, "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "MASTER_PORT"),
])
def test_partial_environment_names_the_missing_variables(present, missing):
    with pytest.raises(UsageError, match=f"but {missing} missing"):
        read_env(present)


def test_pick_backend():
    assert pick_backend("auto", cuda_available=False) == "gloo"
    assert pick_backend("auto", cuda_available=True) == "nccl"
    assert pick_backend("gloo", cuda_available=True) == "gloo"
    assert pick_backend("nccl", cuda_available=True) == "nccl"
    with pytest.raises(UsageError, match=r"dist\.backend=nccl needs CUDA"):
        pick_backend("nccl", cuda_available=False)


def test_pick_device(monkeypatch):
    assert pick_device("gloo", DistEnv(1, 2, 1, 2, "a", 1)).type == "cpu"
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert pick_device("nccl", DistEnv(1, 2, 1, 2, "a", 1)) == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="LOCAL_RANK=3 but only 2 GPUs"):
        pick_device("nccl", DistEnv(3, 4, 3, 4, "a", 1))
