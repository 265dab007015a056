"""`dtrain estimate [CONFIG] [--nproc-per-node N] [--nnodes M] [--gpu-memory-gib G] [overrides]`:
per-rank memory of the task's model under ddp, fsdp and HSDP, without allocating it.

The model is built on the meta device (shapes only, seconds even for 7B parameters); the state
(parameters, gradients, optimizer) follows the rules `state_bytes_per_rank` measures with. The
activations of one micro-batch come from one forward traced under FakeTensorMode: the bytes
autograd saves for backward, with and without activation checkpointing of the units.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from distributed_train.batches import BatchPlan
from distributed_train.cli import described
from distributed_train.cli.launch import default_nproc
from distributed_train.cli.train import resolve_config, split_config_args
from distributed_train.config import Config
from distributed_train.engines.memory import optimizer_slots, predicted_state_bytes
from distributed_train.engines.units import find_units, outermost
from distributed_train.errors import EXIT_OK, UsageError
from distributed_train.task import Task, load_task, on_meta_device
from distributed_train.training.data import batch_fetcher

GIB = 2**30
_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST = ("bf16", "fp16")  # the others compute in the parameters' own dtype (fp64: cast to float64)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="dtrain estimate", description=described(__doc__))
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml | TASK",
                        help="config file (YAML) or a task; overrides follow as --section.key=value")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="ranks (GPUs) per node (default: as dtrain launch, this machine's GPUs, else 2)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes; HSDP replicates across them")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="memory of one device (default: this machine's GPU, else its RAM per rank)")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


@dataclass
class Activations:
    """Bytes autograd keeps for backward in one micro-batch's forward."""

    full: int
    checkpointed: int  # train.activation_checkpointing=units


def trace_activations(task: Task, config: Config, micro_batch: int, precision: str) -> Activations | None:
    """Trace one forward under FakeTensorMode (no memory); None when the model cannot be traced."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = tree_map(lambda t: in_precision(t, precision) if isinstance(t, torch.Tensor) else t,
                     sample_batch(task, micro_batch))
    default = torch.get_default_dtype()
    try:
        # Fake parameters cannot be converted in place: fp64 builds the model in float64 instead.
        torch.set_default_dtype(_DTYPES["fp64"] if precision == "fp64" else default)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            model = task.model()
            units = outermost(find_units(task, model, config.fsdp.units))
            fake = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, batch)
            return _saved_bytes(task, model, units, fake, precision)
    except Exception:  # noqa: BLE001 - an estimate without activations is still useful
        return None
    finally:
        torch.set_default_dtype(default)


def _saved_bytes(task: Task, model: nn.Module, units: list[nn.Module], batch: Any, precision: str) -> Activations:
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    per_unit, inputs = [], []
    for unit in units:  # bytes saved inside each unit, and its input (what checkpointing keeps)
        unit.register_forward_pre_hook(lambda m, a: per_unit.append(-sum(saved.values())) or
                                       inputs.append(sum(t.nbytes for t in a if isinstance(t, torch.Tensor))))
        unit.register_forward_hook(lambda m, a, o: per_unit.append(per_unit.pop() + sum(saved.values())))
    autocast = torch.autocast("cpu", dtype=_DTYPES[precision]) if precision in _AUTOCAST \
        else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        task.loss(model, batch)
    full = sum(saved.values())
    if not per_unit:
        return Activations(full, full)
    return Activations(full, full - sum(per_unit) + sum(inputs) + max(per_unit))


def in_precision(obj: Any, precision: str) -> Any:
    """A model or a tensor as train.precision=fp64 trains it (floating values in float64); else as it is."""
    if precision == "fp64" and (isinstance(obj, nn.Module) or obj.is_floating_point()):
        return obj.to(torch.float64)
    return obj


def sample_batch(task: Task, size: int) -> Any:
    """The first `size` training samples as one batch, as the trainer would collate them."""
    from torch.utils.data import IterableDataset, default_collate

    dataset = task.train_dataset()
    if isinstance(dataset, IterableDataset):  # a stream: its first samples
        return (task.collate_fn() or default_collate)(list(itertools.islice(dataset, size)))
    indices = list(range(min(size, len(dataset))))
    fetch = batch_fetcher(dataset) if task.collate_fn() is None else None
    if fetch is not None:
        return fetch(indices)
    return (task.collate_fn() or default_collate)([dataset[i] for i in indices])


def device_memory_gib(nproc: int) -> float:
    """One device's memory here: the first GPU's, else this machine's RAM shared by `nproc` ranks."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / nproc


def model_summary(task: Task, config: Config) -> tuple[nn.Module, int, list[nn.Module]]:
    """The model on the meta device, the optimizer's states per parameter, and the units."""
    with on_meta_device():
        model = task.model()
    own = task.optimizer(model.parameters(), config)
    if own is not None:
        slots = optimizer_slots(type(own).__name__, own.param_groups[0])
    else:
        slots = optimizer_slots("SGD" if config.train.optimizer == "sgd" else "AdamW",
                                {"momentum": config.train.momentum})
    return model, slots, find_units(task, model, config.fsdp.units)


def rows(model: nn.Module, slots: int, units: list[nn.Module], nproc: int, nnodes: int) -> list[tuple[str, int, dict]]:
    """(engine, shards, state bytes of rank 0) for ddp, fsdp over every rank, and HSDP."""
    world = nproc * nnodes
    out = [("ddp", 1, predicted_state_bytes(model, slots, 1)),
           (f"fsdp ({world} shards)", world, predicted_state_bytes(model, slots, world))]
    if nnodes > 1:
        out.append((f"hsdp ({nnodes}x{nproc})", nproc, predicted_state_bytes(model, slots, nproc)))
    return out


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    args.nproc_per_node = args.nproc_per_node or default_nproc()
    args.gpu_memory_gib = args.gpu_memory_gib or device_memory_gib(args.nproc_per_node)
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UsageError("--nproc-per-node and --nnodes must be >= 1")
    config_path, overrides, _ = split_config_args([*([args.config] if args.config else []), *overrides])
    config = resolve_config(config_path, overrides)  # a TASK in CONFIG's place, as `dtrain train` takes it
    task = load_task(config.task, config)
    model, slots, units = model_summary(task, config)
    world = args.nproc_per_node * args.nnodes
    plan = BatchPlan.make(config.train.batch_size, world, config.train.micro_batch_size)
    n_params = sum(p.numel() for p in model.parameters())
    largest_unit = max((sum(p.numel() for p in u.parameters()) for u in units), default=n_params)
    print(f"{task.name}: {n_params:,} parameters (largest unit {largest_unit:,}), {slots} optimizer "
          f"state(s) per parameter; {world} rank(s) ({args.nnodes} node(s) x {args.nproc_per_node}), "
          f"micro-batch {plan.micro_batch}")
    print(f"{'engine':<18} {'precision':<9} {'params':>9} {'grads':>9} {'optimizer':>9} "
          f"{'activations':>11} {'act. ckpt':>9} {'total':>9}  fits {args.gpu_memory_gib:.4g} GiB")
    # GiB, or MiB for a model whose state is under one GiB (0.00 GiB says nothing)
    unit, unit_name = (GIB, "GiB") if sum(predicted_state_bytes(model, slots, 1).values()) >= GIB else (2**20, "MiB")
    for precision in dict.fromkeys([config.train.precision, "bf16"]):
        activations = trace_activations(task, config, plan.micro_batch, precision)
        sized = in_precision(copy.deepcopy(model), precision)  # fp64 doubles the state; bf16 keeps fp32 masters
        for engine, shards, state in rows(sized, slots, units, args.nproc_per_node, args.nnodes):
            # fsdp also holds the gathered parameters of about two units at a time (compute dtype).
            gathered = 0 if shards == 1 else 2 * largest_unit * _DTYPES[precision].itemsize
            total = sum(state.values()) + gathered + (activations.full if activations else 0)
            least = sum(state.values()) + gathered + (activations.checkpointed if activations else 0)
            fits = "yes" if total <= args.gpu_memory_gib * GIB else \
                "with act. ckpt" if least <= args.gpu_memory_gib * GIB else "no"
            act = f"{activations.full / unit:.2f}" if activations else "n/a"
            ckpt = f"{activations.checkpointed / unit:.2f}" if activations else "n/a"
            print(f"{engine:<18} {precision:<9} {state['parameters'] / unit:>9.2f} {state['gradients'] / unit:>9.2f} "
                  f"{state['optimizer'] / unit:>9.2f} {act:>11} {ckpt:>9} {total / unit:>9.2f}  {fits}")
    print(f"{unit_name} per rank; total = state + activations of one micro-batch (+ gathered units under fsdp)")
    return EXIT_OK
