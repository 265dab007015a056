"""The ddp engine in one process: LR schedule, gradient accumulation, optimizer choice, precision."""

import copy
import math
from pathlib import Path

import pytest
import torch

from distributed_train.batches import BatchPlan
from distributed_train.config import load_config
from distributed_train.distributed import DistEnv
from distributed_train.engines.common import autocast_context, lr_factor
from distributed_train.engines.ddp import DDPEngine
from distributed_train.errors import UsageError
from distributed_train.task import load_task
from tests.helpers import EXACT, FP64

TOY = str(Path(__file__).resolve().parents[1] / "tasks" / "toy.py") + ":Regression"


def test_warmup_then_constant():
    config = load_config(None, ["--train.warmup_steps=4"])
    assert [lr_factor(s, config, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, load_config(), 10) == 1.0  # no warmup, constant: off by default


def test_warmup_then_cosine_to_min_lr():
    config = load_config(None, ["--train.schedule=cosine", "--train.warmup_steps=2", "--train.lr=0.1",
                                "--train.min_lr=0.01"])
    total = 12
    factors = [lr_factor(s, config, total) for s in range(total + 3)]
    assert factors[:3] == [0.5, 1.0, 1.0]  # warmup, then cosine starts at the peak
    assert factors[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert factors[12] == pytest.approx(0.1) and factors[14] == pytest.approx(0.1)  # floor = min_lr / lr
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))


def engine_state(engine) -> dict:
    """Model, optimizer and the rest of what a checkpoint holds of an engine, live (not copies)."""
    return {"model": engine.raw_model.state_dict(), "optimizer": engine.optimizer.state_dict(), **engine.extra_state()}


def make_engine(overrides, micro_batch=None, batch=12):
    config = load_config(None, [f"--task={TOY}", f"--train.batch_size={batch}", *overrides])
    task = load_task(config.task, config)
    torch.manual_seed(0)
    plan = BatchPlan.make(batch, 1, micro_batch)
    return DDPEngine(task, config, DistEnv(), torch.device("cpu"), plan, total_steps=10), task


def global_batch(task, n=12):
    x, y = task.train_dataset()[:n]
    return x, y


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulated_micro_batches_equal_one_full_batch(optimizer):
    # In float64: Adam would amplify float32 rounding of the two summation orders (helpers.EXACT).
    job = [FP64, f"--train.optimizer={optimizer}", "--train.lr=0.1"]
    full, task = make_engine(job)
    accumulated, _ = make_engine(job, micro_batch=4)
    assert accumulated.plan.accumulation_steps == 3
    x, y = global_batch(task)
    for _ in range(3):
        loss_full, _ = full.train_step([(x, y)])
        loss_acc, _ = accumulated.train_step([(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)])
        assert loss_acc.item() == pytest.approx(loss_full.item(), rel=EXACT)  # the mean over B
    for a, b in zip(full.raw_model.parameters(), accumulated.raw_model.parameters()):
        assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=0, atol=EXACT)
    assert all(p.grad is None for p in full.raw_model.parameters())  # zeroed after the step


def test_default_optimizers_and_lr_follow_the_schedule():
    sgd, _ = make_engine(["--train.optimizer=sgd", "--train.momentum=0.5", "--train.lr=0.2"])
    assert isinstance(sgd.optimizer, torch.optim.SGD)
    assert sgd.optimizer.param_groups[0]["momentum"] == 0.5
    adamw, task = make_engine(["--train.warmup_steps=2", "--train.lr=0.2", "--train.weight_decay=0.01"])
    assert isinstance(adamw.optimizer, torch.optim.AdamW)
    assert adamw.optimizer.param_groups[0]["weight_decay"] == 0.01
    assert adamw.lr == pytest.approx(0.1)  # warmup step 0
    adamw.train_step([global_batch(task)])
    assert adamw.lr == pytest.approx(0.2)
    assert not isinstance(adamw.model, torch.nn.parallel.DistributedDataParallel)  # world size 1


def test_task_optimizer_wins(monkeypatch):
    task = load_task(TOY)
    monkeypatch.setattr(type(task.obj), "optimizer",
                        lambda self, params, config: torch.optim.SGD(params, lr=0.123), raising=False)
    engine, _ = make_engine([])
    assert isinstance(engine.optimizer, torch.optim.SGD) and engine.lr == 0.123


def test_grad_clip_returns_the_norm_and_clips():
    engine, task = make_engine(["--train.grad_clip=0.001", "--train.optimizer=sgd", "--train.lr=1",
                                "--train.momentum=0"])
    before = [p.detach().clone() for p in engine.raw_model.parameters()]
    _, norm = engine.train_step([global_batch(task)])
    assert norm is not None and norm.item() > 0.001
    change = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(engine.raw_model.parameters(), before)))
    assert change.item() == pytest.approx(0.001, rel=1e-3)  # lr 1 x the clipped gradient norm
    unclipped, _ = make_engine([])
    assert unclipped.train_step([global_batch(task)])[1] is None


def test_precision_on_cpu():
    with pytest.raises(UsageError, match=r"train\.precision=fp16 needs a CUDA device"):
        make_engine(["--train.precision=fp16"])
    with autocast_context("bf16", torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    for precision, matmul_dtype in [("bf16", torch.bfloat16), ("fp32", torch.float32)]:
        engine, task = make_engine([f"--train.precision={precision}"])
        seen = []  # the dtype each Linear computes in (its output), in training and in evaluation
        for layer in (engine.raw_model[0], engine.raw_model[2]):
            layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        loss, _ = engine.train_step([global_batch(task)])
        assert seen == [matmul_dtype] * 2, (precision, seen)
        with engine.autocast():
            engine.raw_model(global_batch(task)[0])
        assert seen[2:] == [matmul_dtype] * 2, (precision, seen)
        # Autocast casts per op: the parameters (the optimizer's master weights) stay fp32.
        assert torch.isfinite(loss) and all(p.dtype == torch.float32 for p in engine.raw_model.parameters())


def test_fp64_trains_the_model_and_its_floating_inputs_in_float64():
    engine, task = make_engine([FP64])
    seen = []  # the dtype each Linear computes in
    for layer in (engine.raw_model[0], engine.raw_model[2]):
        layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    loss, norm = engine.train_step([global_batch(task)], measure_grad_norm=True)
    assert seen == [torch.float64] * 2 and loss.dtype == torch.float64 and norm.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in engine.raw_model.parameters())
    moments = engine.optimizer.state_dict()["state"][0]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.float64
    assert engine.model_state_dict()["0.weight"].dtype == torch.float64  # what final_model.pt holds
    # Evaluation casts its batches alike; integer tensors (ids, labels) keep their dtype.
    from distributed_train.batches import move_to_device

    x, y, ids = move_to_device(task.eval_dataset()[:3], torch.device("cpu"), float_dtype=engine.float_dtype)
    assert (x.dtype, y.dtype, ids.dtype) == (torch.float64, torch.float64, torch.int64)
    with pytest.raises(UsageError, match=r"train\.precision=fp64 needs a CPU or CUDA device \(mps"):
        autocast_context("fp64", torch.device("mps"))


def test_bf16_comm_hook_on_cpu_is_a_usage_error():
    # torch's bf16 hook raises a TypeError inside DDP on gloo; say it before building anything.
    with pytest.raises(UsageError, match=r"ddp\.comm_hook=bf16 needs CUDA GPUs .* use ddp\.comm_hook=fp16 or none"):
        make_engine(["--ddp.comm_hook=bf16"])


def differences(a, b, path="") -> list[str]:
    """Where two nested state dicts differ: tensors bit for bit (torch.equal), everything else by ==."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [path]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_a_skipped_step_leaves_parameters_and_optimizer_state_bit_identical(monkeypatch):
    """train.nonfinite=skip (docs/robustness.md): no update, no optimizer-state change; the LR
    schedule still advances. Clipping on, so the NaN gradient norm goes through the check too."""
    engine, task = make_engine(["--train.nonfinite=skip", "--train.warmup_steps=4", "--train.weight_decay=0.1",
                                "--train.grad_clip=1"])
    engine.train_step([global_batch(task)])  # AdamW's moments and step count exist from here on
    before = copy.deepcopy(engine_state(engine))
    finite_loss = task.obj.loss  # the task's own method, as the step calls it
    monkeypatch.setattr(task.obj, "loss", lambda model, batch: finite_loss(model, batch) * float("nan"))
    loss, norm = engine.train_step([global_batch(task)])
    assert torch.isnan(loss) and torch.isnan(norm) and engine.skipped_steps == 1
    after = copy.deepcopy(engine_state(engine))  # the model entries are the live parameters
    assert differences(before["model"], after["model"]) == []
    assert differences(before["optimizer"]["state"], after["optimizer"]["state"]) == []
    assert before["optimizer"]["state"][0]["step"].item() == 1  # the skipped step is not counted by AdamW
    # Only the schedule moved: step 2 of the warmup.
    assert after["scheduler"]["last_epoch"] == before["scheduler"]["last_epoch"] + 1 == 2
    lrs = [(b["lr"], a["lr"]) for b, a in zip(before["optimizer"]["param_groups"], after["optimizer"]["param_groups"])]
    assert lrs == [(0.5e-3, 0.75e-3)] * len(lrs)
    for group in (*before["optimizer"]["param_groups"], *after["optimizer"]["param_groups"]):
        del group["lr"]
    assert differences(before["optimizer"]["param_groups"], after["optimizer"]["param_groups"]) == []
    assert all(p.grad is None for p in engine.raw_model.parameters())  # no NaN gradient left behind
    # The check could fail: the next finite step updates both.
    monkeypatch.setattr(task.obj, "loss", finite_loss)
    engine.train_step([global_batch(task)])
    assert differences(after["model"], engine_state(engine)["model"]) != [] and engine.skipped_steps == 1
    assert engine.optimizer.state_dict()["state"][0]["step"].item() == 2


def test_state_dict_has_no_module_prefix_and_round_trips(tmp_path):
    # Through the one checkpoint format (DCP shards + train_state.pt), as a resume restores it.
    from distributed_train.training.checkpoints.shards import ShardedWriter, load_model_and_optimizer, read_model

    engine, task = make_engine([])
    engine.train_step([global_batch(task)])
    path = ShardedWriter(tmp_path, is_main=True, rotate=lambda step: None).save_alone(1, engine, {"step": 1})
    assert read_model(path).keys() == engine.raw_model.state_dict().keys()  # no "module." prefix
    other, _ = make_engine([])
    load_model_and_optimizer(other, path)
    other.load_extra_state(engine.extra_state())
    for a, b in zip(engine.raw_model.parameters(), other.raw_model.parameters()):
        assert torch.equal(a, b)
    assert differences(other.optimizer.state_dict(), engine.optimizer.state_dict()) == []
    assert other.scheduler.state_dict() == engine.scheduler.state_dict()


def test_batchnorm_on_several_ranks_warns_and_sync_batchnorm_needs_cuda(package_log):
    from torch import nn

    from distributed_train.engines.common import batch_statistics

    config = load_config(None, [])
    with_bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    for env, model in [(DistEnv(rank=0, world_size=1), with_bn), (DistEnv(rank=1, world_size=2), with_bn),
                       (DistEnv(rank=0, world_size=2), nn.Linear(4, 1))]:
        assert batch_statistics(model, config, env, torch.device("cpu")) is model
    assert "BatchNorm" not in package_log.text  # one rank, not rank 0, or no batch statistics: nothing to say
    batch_statistics(with_bn, config, DistEnv(rank=0, world_size=2), torch.device("cpu"))
    assert "the model has BatchNorm layers (1)" in package_log.text
    assert "depend on the world size" in package_log.text and "ddp.sync_batchnorm=true" in package_log.text
    synced = load_config(None, ["--ddp.sync_batchnorm=true"])
    with pytest.raises(UsageError, match=r"ddp\.sync_batchnorm=true needs CUDA GPUs"):
        batch_statistics(with_bn, synced, DistEnv(rank=0, world_size=2), torch.device("cpu"))
    converted = batch_statistics(with_bn, synced, DistEnv(rank=0, world_size=2), torch.device("cuda", 0)) \
        if torch.cuda.is_available() else None
    assert converted is None or isinstance(converted[1], nn.SyncBatchNorm)


def test_only_rank_0_copies_the_final_model_to_host_memory():
    from distributed_train.distributed import DistEnv as Env

    engine, _ = make_engine([])
    assert set(engine.model_state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    engine.env = Env(rank=1, world_size=2)  # a replica: rank 0 writes final_model.pt
    assert engine.model_state_dict() == {}
