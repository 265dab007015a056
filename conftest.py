"""Fixtures for every test: the same environment whatever the caller's shell holds, no leaked
process group, no leaked torchrun variables."""

import os

import pytest

from tests.helpers import TORCHRUN_VARS

# Variables a user's shell often sets that change what the program does (wandb mode, thread
# counts, visible GPUs, torch and torchrun settings, a Kubeflow or Accelerate launcher's hints).
# The suite clears them once, before any test or subprocess starts; tests set what they rely on.
CALLER_PREFIXES = ("WANDB_", "TORCH_", "TORCHELASTIC_", "PET_", "ACCELERATE_", "KUBEFLOW_TRAINER_",
                   "NCCL_", "GLOO_", "DTRAIN_")
CALLER_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NETRC", "GROUP_RANK",
               "ROLE_RANK", *TORCHRUN_VARS)
# Settings of the test run itself: where the optional security scanner lives; whether a real runtime
# that cannot start fails its tests instead of skipping them (CI).
KEEP = {"DTRAIN_CHECKOV", "DTRAIN_REQUIRE_RUNTIMES"}
for _name in [n for n in os.environ if (n.startswith(CALLER_PREFIXES) or n in CALLER_VARS) and n not in KEEP]:
    del os.environ[_name]
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture
def package_log(caplog):
    """`caplog`, also attached to the package's logger: an earlier test in the same worker may have
    set up the job's logging, which turns that logger's propagation to the root off."""
    import logging

    logger = logging.getLogger("distributed_train")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(autouse=True)
def _no_distributed_leaks():
    before = {k: os.environ.get(k) for k in TORCHRUN_VARS}
    yield
    import torch.distributed as torch_dist
    leaked = torch_dist.is_available() and torch_dist.is_initialized()
    if leaked:
        torch_dist.destroy_process_group()
    changed = [k for k in TORCHRUN_VARS if os.environ.get(k) != before[k]]
    for k in changed:
        if before[k] is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = before[k]
    assert not leaked, "test left a process group initialized"
    assert not changed, f"test leaked environment variables: {changed}"
