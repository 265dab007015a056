"""The loop a user would write without this project, the way the PyTorch DDP tutorial writes it.

    torchrun --standalone --nproc-per-node 2 benchmarks/plain_ddp.py --workload digits --out DIR

DistributedSampler with set_epoch, a DataLoader, DDP, AdamW, loss.backward(), step(). It reads
the dataset, model and loss from the same task `dtrain` trains (benchmarks/workloads.py), seeds
the same way and visits the same samples in the same order, so both end at the same loss.
Rank 0 writes DIR/plain.jsonl (one line per log step) and DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from workloads import SEED, WORKLOADS, build_task


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the workload's)")
    parser.add_argument("--log-every", type=int, help="log the mean loss every N steps")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True), which the tutorial loop does not do")
    parser.add_argument("--fused", action="store_true",
                        help="AdamW(fused=True), the kernel dtrain uses (the tutorial takes torch's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: gloo; cuda: nccl, one GPU per rank (cuda:LOCAL_RANK), TF32 as dtrain")
    parser.add_argument("--out", required=True, help="folder for plain.jsonl and summary.json")
    return parser.parse_args()


def to_device(batch, device: torch.device):
    """The batch's tensors on `device` (asynchronous copies from pinned memory on CUDA)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


def mean_across_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    torch_dist.all_reduce(value)
    return (value / torch_dist.get_world_size()).item()


@torch.no_grad()
def evaluate(task, model, batch_size: int, device: torch.device) -> float:
    """Mean loss over the eval set (every rank a shard; the tutorial's DistributedSampler pads)."""
    dataset = task.eval_dataset()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=DistributedSampler(dataset, shuffle=False))
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in loader:
        n = batch[1].shape[0]
        total += task.loss(model, to_device(batch, device)) * n
        count += n
    sums = torch.stack([total, count])
    torch_dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def all_gather(value: int) -> list[int]:
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, value)
    return out


def local_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters + gradients + optimizer state this rank holds (its shards under FSDP2)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    # Gradients are as large as the trainable parameters while a step runs (freed between steps).
    tensors = [*model.parameters(), *(p for p in model.parameters() if p.requires_grad),
               *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())]
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def main(wrap=ddp, unwrap=lambda model: model.module) -> None:
    """The loop; `wrap(model, device)` makes the model distributed (plain_fsdp.py passes FSDP2's)."""
    args = parse_args()
    workload = WORKLOADS[args.workload]
    steps, log_every = args.steps or workload.steps, args.log_every or workload.log_every
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32, as dtrain's train.tf32 default
    torch_dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = torch_dist.get_rank()
    torch.manual_seed(SEED)

    task = build_task(workload)
    dataset = task.train_dataset()
    # seed: dtrain's epoch permutation is randperm seeded with seed * 100_003 + epoch, which is
    # DistributedSampler's seed + epoch: the same sample order, so the same math.
    sampler = DistributedSampler(dataset, shuffle=True, seed=SEED * 100_003, drop_last=True)
    loader = DataLoader(dataset, batch_size=workload.batch_per_rank, sampler=sampler, drop_last=True,
                        pin_memory=device.type == "cuda")
    model = wrap(task.model().to(device), device)
    kernel = {"fused": True} if args.fused else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=workload.lr, weight_decay=0.0, **kernel)

    out = open(os.path.join(args.out, "plain.jsonl"), "w") if rank == 0 else None
    start, step, epoch, window_loss = time.perf_counter(), 0, 0, torch.zeros((), device=device)
    while step < steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            model.train()
            optimizer.zero_grad()
            loss = task.loss(model, to_device(batch, device))
            loss.backward()
            optimizer.step()
            window_loss += loss.detach()
            step += 1
            if step % log_every == 0 or step == steps:
                mean = mean_across_ranks(window_loss / (log_every if step % log_every == 0 else step % log_every))
                window_loss = torch.zeros((), device=device)
                if out:
                    out.write(json.dumps({"step": step, "time": time.time(), "loss": mean}) + "\n")
                    out.flush()
            if step == steps:
                break
        epoch += 1
    train_s = time.perf_counter() - start
    eval_loss = evaluate(task, unwrap(model), workload.batch_per_rank, device)
    state_bytes = max(all_gather(local_state_bytes(model, optimizer)))
    state = unwrap(model).state_dict()  # full tensors; under FSDP2 gathering them is a collective
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    if rank == 0:
        torch.save(state, os.path.join(args.out, "final_model.pt"))
        summary = {"train_loss": mean, "eval_loss": eval_loss, "global_step": step,
                   "state_bytes_per_rank": state_bytes,
                   "samples_per_s": step * workload.batch_per_rank * torch_dist.get_world_size() / train_s}
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f)
        out.close()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
