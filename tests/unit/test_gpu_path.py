"""What GPUs take, checked without one: NCCL failures explained (exit 4), a stuck rank named, TF32
and NCCL error handling set before the process group, CPU copies for checkpoints."""

import os
import time

import pytest
import torch

from distributed_train.dist import diagnose
from distributed_train.errors import EXIT_COMMUNICATION, CommunicationFailure, user_errors
from distributed_train.training import run as worker

# What torch 2.13's ProcessGroupNCCL raises in the training thread after its watchdog aborted the
# communicator (TORCH_NCCL_ASYNC_ERROR_HANDLING=2).
NCCL_TIMEOUT = ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=812, "
                "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=300000) ran for 300041 "
                "milliseconds before timing out.")


def _beat(step, phase, phase_s, silent_s=0.5):
    return {"rank": 1, "host": "node-b", "pid": 4242, "step": step, "phase": phase, "left": None,
            "phase_s": phase_s, "time": time.time() - silent_s}


@pytest.mark.parametrize("exc", [
    RuntimeError(NCCL_TIMEOUT),
    torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1."),
    RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:2046, remote process exited or there was a "
                 "network error, NCCL version 2.27.3\nncclRemoteError: A call failed possibly due to a "
                 "network error or a remote process exiting prematurely."),
])
def test_nccl_failures_become_one_line_and_exit_4(monkeypatch, exc):
    diagnose.at("all_reduce in log()", step=812)
    monkeypatch.setattr(diagnose, "read_positions", lambda world: {1: _beat(812, "all_reduce in log()", 300)})
    explained = diagnose.explain_communication_failure(exc, rank=0, world_size=2, timeout_s=300)
    assert isinstance(explained, CommunicationFailure) and "\n" not in str(explained)
    assert "rank 0: all_reduce in log() of step 812" in str(explained)
    with pytest.raises(SystemExit) as code:
        with user_errors(debug=False):
            raise explained
    assert code.value.code == EXIT_COMMUNICATION


def test_a_rank_whose_main_thread_hangs_is_called_stuck_although_its_heartbeat_lives():
    mine = (812, "all_reduce in log()")
    stuck = diagnose._describe_peer(1, _beat(812, "task.loss()", phase_s=400), mine, timeout_s=300)
    assert "rank 1 is stuck" in stuck and "task.loss() of step 812" in stuck and "pid 4242" in stuck
    late = diagnose._describe_peer(1, _beat(812, "task.loss()", phase_s=4), mine, timeout_s=300)
    assert "did not arrive" in late
    waiting = diagnose._describe_peer(1, _beat(812, "all_reduce in log()", phase_s=400), mine, timeout_s=300)
    assert waiting is None  # waits in the same collective: a victim, not the cause
    dead = diagnose._describe_peer(1, _beat(812, "task.loss()", phase_s=1, silent_s=60), mine, timeout_s=300)
    assert "stopped responding" in dead


def test_nccl_error_handling_is_set_before_the_group_and_a_user_setting_wins(monkeypatch):
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    worker.use_nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    worker.use_nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_tf32_switches_matmuls_and_convolutions_together():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        worker.set_tf32(True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        worker.set_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
