"""What GPUs take, checked without one: NCCL failures explained (exit 4), a stuck rank named, TF32
and NCCL error handling set before the process group, CPU copies for checkpoints."""

import os
import time

import pytest
import torch

from distributed_train.distributed import diagnose
from distributed_train.engines import tf32
from distributed_train.errors import (
    EXIT_COMMUNICATION,
    CommunicationFailure,
    user_errors,
)
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


@pytest.mark.parametrize("backend, failed, expected", [
    ("nccl", True, "abort"), ("cpu:gloo,cuda:nccl", True, "abort"),
    ("nccl", False, "destroy"), ("gloo", True, "destroy"),
])
def test_a_failed_worker_aborts_an_nccl_group_instead_of_flushing_it(tmp_path, monkeypatch, backend, failed,
                                                                     expected):
    """destroy_process_group flushes NCCL's collectives in flight (torch 2.6+): after a failure
    it would wait for ever on a lost peer, so the group is aborted and the worker reports."""
    import torch.distributed as torch_dist
    from torch.distributed import distributed_c10d

    from distributed_train.distributed import group

    calls = []
    real_destroy, real_abort = torch_dist.destroy_process_group, distributed_c10d._abort_process_group
    monkeypatch.setattr(torch_dist, "destroy_process_group", lambda: (calls.append("destroy"), real_destroy()))
    monkeypatch.setattr(distributed_c10d, "_abort_process_group", lambda: (calls.append("abort"), real_abort()))
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(torch_dist, "get_backend", lambda group=None: backend)  # as an NCCL job reports it
    group.teardown(failed)
    assert calls == [expected] and not torch_dist.is_initialized()
    group.teardown(failed)  # twice: nothing left to do
    assert calls == [expected]


@pytest.mark.parametrize("task, failed", [("tests.tasks.toy:Regression", False),
                                          ("tests.tasks.broken_tasks:RaisingLoss", True)])
def test_the_worker_tears_down_as_failed_only_when_training_failed(tmp_path, monkeypatch, task, failed):
    from distributed_train import distributed
    from distributed_train.cli.train import resolve_config

    seen = []
    monkeypatch.setattr(distributed, "teardown", lambda failed=False: seen.append(failed))
    config = resolve_config(None, [f"--task={task}", "--task_args.rank=0", "--train.max_steps=4",
                                   "--log.wandb=disabled", f"--run_dir={tmp_path / 'run'}"])
    if failed:
        with pytest.raises(Exception, match="simulated crash"):
            worker.run_training(config, distributed.DistEnv())
    else:
        worker.run_training(config, distributed.DistEnv())
    assert seen == [failed]


def test_nccl_error_handling_is_set_before_the_group_and_a_user_setting_wins(monkeypatch):
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    worker.use_nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    worker.use_nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


@pytest.fixture
def tf32_restored():
    """Every fp32 precision setting as it was before the test (both APIs' views stay consistent)."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):  # the legacy getters may raise after it is set
        saved = [(obj, "fp32_precision", obj.fp32_precision) for obj in
                 (backends, backends.cudnn, backends.cudnn.rnn, backends.cudnn.conv, backends.cuda.matmul)]
    else:
        saved = [(backends.cuda.matmul, "allow_tf32", backends.cuda.matmul.allow_tf32),
                 (backends.cudnn, "allow_tf32", backends.cudnn.allow_tf32)]
    yield
    for obj, name, value in reversed(saved):
        setattr(obj, name, value)


def test_tf32_switches_matmuls_and_convolutions_together(tf32_restored):
    worker.set_tf32(True)
    assert tf32.tf32_enabled()
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        backends = torch.backends
        precisions = {backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision,
                      backends.cudnn.rnn.fp32_precision}
        assert precisions == {"tf32"}
        worker.set_tf32(False)
        assert {backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision,
                backends.cudnn.rnn.fp32_precision} == {"ieee"}
    worker.set_tf32(False)
    assert not tf32.tf32_enabled()


def test_tf32_after_a_task_set_the_new_api_neither_raises_nor_misreads(tf32_restored):
    """A task that sets torch's per-backend fp32_precision makes the legacy getters raise ("mix of
    the legacy and new APIs"): the MFU's peak lookup read one of them."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 switches")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new"):
        torch.get_float32_matmul_precision()  # what the project read before
    assert tf32.tf32_enabled()
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert not tf32.tf32_enabled()
    torch.backends.fp32_precision = "tf32"  # "none" below it inherits this
    torch.backends.cuda.matmul.fp32_precision = "none"
    assert tf32.tf32_enabled()
    worker.set_tf32(False)
    assert not tf32.tf32_enabled()


def test_tf32_with_only_the_legacy_switches(tf32_restored, monkeypatch):
    """torch before 2.9 has no fp32_precision attributes: the legacy switches are set and read."""
    class Legacy:
        allow_tf32 = False

    matmul, cudnn = Legacy(), Legacy()
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    tf32.set_tf32(True)
    assert matmul.allow_tf32 and cudnn.allow_tf32 and tf32.tf32_enabled()
    tf32.set_tf32(False)
    assert not matmul.allow_tf32 and not cudnn.allow_tf32 and not tf32.tf32_enabled()
    cudnn.allow_tf32 = True  # torch's default: convolutions on TF32
    assert tf32.tf32_enabled()


@pytest.mark.parametrize("name, model, bf16_tflops", [
    ("NVIDIA H100 80GB HBM3", "H100", 989),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756),
    ("NVIDIA H100 NVL", "H100 NVL", 835),
    ("NVIDIA H200", "H200", 989),
    ("NVIDIA H200 NVL", "H200 NVL", 835),  # a PCIe card, not the SXM part
    ("NVIDIA H800", "H800", 989),
    ("NVIDIA H800 PCIe", "H800 PCIe", 756),
    ("NVIDIA GH200 480GB", "GH200", 989),
    ("NVIDIA A100-SXM4-80GB", "A100", 312),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe", 312),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe", 312),
    ("NVIDIA A800-SXM4-80GB", "A800", 312),
    ("NVIDIA A800 80GB PCIe", "A800 PCIe", 312),
    ("NVIDIA L40S", "L40S", 362),
    ("NVIDIA L40", "L40", 181),  # not an L4
    ("NVIDIA L4", "L4", 121),
    ("NVIDIA A10", "A10", 125),
    ("NVIDIA A10G", "A10G", None),  # not an A10, and no data sheet: no MFU rather than a wrong one
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165),
    ("NVIDIA RTX 6000 Ada Generation", "RTX 6000", None),
    ("NVIDIA RTX A6000", "RTX A6000", None),
    ("NVIDIA B200", "B200", 2250),
    ("NVIDIA GB200", "GB200", 2500),
    ("Tesla V100-SXM2-16GB", "V100", None),  # no bf16 tensor cores
    ("Tesla V100-PCIE-32GB", "V100 PCIe", None),
    ("Tesla T4", "T4", None),
])
def test_the_peak_table_matches_exact_gpu_models(name, model, bf16_tflops):
    from distributed_train.training.reporting import flops

    assert flops.gpu_model(name) == model
    assert flops.peak_flops_for_name(name, "bf16", tf32=False) == (bf16_tflops * 1e12 if bf16_tflops else None)


def test_fp32_is_measured_against_the_tf32_peak_while_cudnn_may_use_tf32(tf32_restored):
    from distributed_train.training.reporting import flops

    torch.set_float32_matmul_precision("highest")  # a task may use the legacy switches
    torch.backends.cudnn.allow_tf32 = True  # torch's default: convolutions run TF32
    assert flops.tf32_enabled()
    torch.backends.cudnn.allow_tf32 = False
    assert not flops.tf32_enabled()
    assert flops.peak_flops_for_name("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156e12


def test_the_checkpoint_copy_is_a_detached_cpu_copy_of_every_tensor():
    from collections import OrderedDict

    from distributed_train.batches import to_cpu_copy

    weight = torch.nn.Parameter(torch.ones(2, 3))
    state = {"model": OrderedDict(w=weight), "rng": [torch.arange(3), (1, "x")], "step": 7,
             "strided": torch.arange(6.0).view(2, 3).t()}
    copy = to_cpu_copy(state)
    with torch.no_grad():
        weight.add_(1)
    assert torch.equal(copy["model"]["w"], torch.ones(2, 3)) and not copy["model"]["w"].requires_grad
    assert isinstance(copy["rng"][1], tuple) and copy["step"] == 7
    assert torch.equal(copy["strided"], state["strided"]) and copy["strided"].data_ptr() != state["strided"].data_ptr()
    assert all(t.device.type == "cpu" for t in (copy["model"]["w"], copy["rng"][0], copy["strided"]))


def test_final_model_state_is_built_by_the_same_copy_path(monkeypatch):
    from distributed_train import batches
    from distributed_train.engines.base import EngineBase

    calls = []
    monkeypatch.setattr(batches, "to_cpu_copy", lambda obj: calls.append(obj) or obj)
    from distributed_train.distributed import DistEnv

    engine = object.__new__(EngineBase)
    engine.raw_model, engine.env = torch.nn.Linear(2, 1), DistEnv()
    assert set(engine.model_state_dict()) == {"weight", "bias"} and len(calls) == 1


def test_accelerate_sharded_evaluates_the_prepared_model_and_saves_the_whole_model():
    pytest.importorskip("accelerate")
    from types import SimpleNamespace

    from distributed_train.distributed import DistEnv
    from distributed_train.engines.accelerate import AccelerateEngine

    whole = {"weight": torch.ones(4, 2)}
    accelerator = SimpleNamespace(get_state_dict=lambda model: whole,
                                  clip_grad_norm_=lambda params, clip: None)  # as under DeepSpeed
    engine = object.__new__(AccelerateEngine)
    engine.model, engine.raw_model = torch.nn.Linear(2, 4), torch.nn.Linear(2, 1)  # prepared / a shard
    engine.accelerator, engine.device = accelerator, torch.device("cpu")
    engine.config = SimpleNamespace(train=SimpleNamespace(grad_clip=1.0))
    engine.sharded, engine._full_state, engine.env = True, None, DistEnv()
    assert engine.eval_model() is engine.model
    engine.sync_buffers()  # every rank, before the final evaluation
    assert torch.equal(engine.model_state_dict()["weight"], whole["weight"])
    assert engine.clip_or_measure(True) is None
    engine.sharded = False
    assert engine.eval_model() is engine.raw_model and set(engine.model_state_dict()) == {"weight", "bias"}


def test_the_launcher_names_the_worker_that_failed_first(monkeypatch, capsys):
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from distributed_train.cli.launch import run_torchrun, torchrun_parser

    first, shut_down = ProcessFailure(1, 200, 1, "<N/A>"), ProcessFailure(0, 100, -15, "<N/A>")
    first.timestamp, shut_down.timestamp = 1000, 1005  # rank 1 failed; torchrun then stopped rank 0

    def fail(parsed):
        raise ChildFailedError("train", {0: shut_down, 1: first})

    monkeypatch.setattr(torch.distributed.run, "run", fail)
    assert run_torchrun(torchrun_parser().parse_args(["x.py"])) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtrain launch:")]
    assert lines[0].startswith("dtrain launch: worker rank 1 (pid 200) exited with code 1")
    assert lines[0].endswith("(the first to fail)")
    assert lines[1].startswith("dtrain launch: worker rank 0 (pid 100) died from SIGTERM")


def test_the_launcher_explains_a_worker_killed_by_a_signal():
    from distributed_train.cli.launch import describe_exit

    assert "SIGABRT" in describe_exit(-6) and "TORCH_NCCL_ASYNC_ERROR_HANDLING" in describe_exit(-6)
    assert "out of memory" in describe_exit(-9) and describe_exit(1) == "exited with code 1; its error is above"


def test_charlm_eval_counts_are_python_numbers_not_per_batch_copies():
    from types import SimpleNamespace

    from distributed_train.tasks.charlm import CharLMTask

    task = CharLMTask(SimpleNamespace(task_args={"preset": "tiny", "n_layer": 1}))
    x, y = task.eval_dataset()[0]
    pairs = task.metrics(task.model(), (x[None], y[None]))
    assert all(isinstance(count, int) and count == y.numel() for _, count in pairs.values())


def test_a_peer_that_closed_its_connection_is_said_to_have_ended_not_to_be_slow(monkeypatch):
    """A node killed mid-step: its last heartbeat (in task.loss()) may be read before its process
    is seen gone. A reset connection is not a slow peer: no advice to profile it."""
    diagnose.at("backward (DDP gradient all-reduce)", step=7)
    monkeypatch.setattr(diagnose, "read_positions", lambda world: {1: _beat(4, "task.loss()", 0.1)})
    monkeypatch.setattr(diagnose, "process_state", lambda host, pid: "running")
    exc = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:58065: "
                       "Connection reset by peer")
    explained = str(diagnose.explain_communication_failure(exc, rank=0, world_size=2, timeout_s=300))
    assert "rank 1 did not arrive: it is in task.loss() of step 4" in explained
    assert "closed its connection: it ended or is ending" in explained and "py-spy" not in explained


def test_the_log_windows_time_is_read_after_the_host_waited_for_the_device(monkeypatch):
    """On a GPU the host runs ahead: the window's work is done only when the loss is read back
    (global_loss's host read). The elapsed time, hence samples/s, step time and MFU, is taken
    after it; read before, the rates would count only what the host had queued."""
    from types import SimpleNamespace

    from distributed_train.config import LogConfig, TrainConfig
    from distributed_train.distributed import DistEnv
    from distributed_train.training.reporting.step_metrics import TrainMetrics

    events = []
    logger = SimpleNamespace(total_steps=10, log=events.append, clock=SimpleNamespace(add=lambda *a: None))
    env = DistEnv()
    metrics = TrainMetrics(TrainConfig(batch_size=4), LogConfig(), env, torch.device("cpu"),
                           SimpleNamespace(tokens_per_sample=None), logger, lambda rate: None)
    metrics.add(torch.tensor(1.0), None, 0.0)

    def device_work_then_loss(step):  # what the host waits for at the read: the queued steps
        time.sleep(0.2)
        return 1.0

    monkeypatch.setattr(metrics, "global_loss", device_work_then_loss)
    metrics.log(1, 0, SimpleNamespace(lr=0.1, skipped_steps=0))
    (event,) = events
    assert event["step_time_s"] >= 0.2 and event["samples_per_s"] <= 4 / 0.2, event


def test_fsdp_cpu_offload_gets_a_cpu_backend_beside_nccl():
    from distributed_train.config import load_config

    offload = load_config(None, ["--engine=fsdp", "--fsdp.cpu_offload=true"])
    assert worker.group_backend("nccl", offload) == "cpu:gloo,cuda:nccl"  # the grad norm of host shards
    assert worker.group_backend("nccl", load_config(None, ["--engine=fsdp"])) == "nccl"
    assert worker.group_backend("gloo", offload) == "gloo"


def test_each_local_rank_gets_its_share_of_the_compile_workers(monkeypatch):
    import torch._inductor.config as inductor

    from distributed_train import distributed
    from distributed_train.distributed import DistEnv

    monkeypatch.setattr(inductor, "compile_threads", inductor.compile_threads)  # restored afterwards
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(distributed.group, "cpu_count", lambda: 16)
    assert distributed.limit_compile_threads(DistEnv(local_world_size=8)) == 2
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "2"
    assert inductor.compile_threads == 2
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "5")  # the user's choice wins
    assert distributed.limit_compile_threads(DistEnv(local_world_size=8)) == 5


def test_a_compiler_failure_on_the_first_step_is_not_blamed_on_the_task():
    from distributed_train.errors import TrainingFailure

    def broken_backend(graph, example_inputs):  # as Inductor or Triton failing on a GPU
        raise RuntimeError("triton: out of resource: shared memory")

    compiled = torch.compile(lambda x: x * 2 + 1, backend=broken_backend)
    with pytest.raises(Exception) as caught:
        compiled(torch.ones(3))
    diagnose.at("forward/backward", step=1)
    explained = diagnose.explain_step_error(caught.value, first_step=True)
    assert isinstance(explained, TrainingFailure) and "torch.compile failed in forward/backward at step 1" in \
        str(explained) and "train.compile=false" in str(explained) and "fix the task" not in str(explained)
    task_mistake = diagnose.explain_step_error(KeyError("label"), first_step=True)
    assert "fix the task" in str(task_mistake)  # a task's own error on the first step still is one
