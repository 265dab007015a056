"""Fixtures for every test: no leaked process group, no leaked torchrun variables."""

import os

import pytest

from tests.helpers import TORCHRUN_VARS


@pytest.fixture(autouse=True)
def _no_distributed_leaks():
    before = {k: os.environ.get(k) for k in TORCHRUN_VARS}
    os.environ.setdefault("WANDB_MODE", "disabled")
    yield
    import torch.distributed as dist

    leaked = dist.is_available() and dist.is_initialized()
    if leaked:
        dist.destroy_process_group()
    changed = [k for k in TORCHRUN_VARS if os.environ.get(k) != before[k]]
    for k in changed:
        if before[k] is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = before[k]
    assert not leaked, "test left a process group initialized"
    assert not changed, f"test leaked environment variables: {changed}"
