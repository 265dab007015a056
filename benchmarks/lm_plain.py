"""The loop a nanoGPT user writes, over the same memory-mapped token file as the `lm` workload.

    torchrun --standalone --nproc-per-node 2 benchmarks/lm_plain.py --workload lm --out DIR

nanoGPT's get_batch: map the file anew for every batch (a long-lived np.memmap grows the
process's memory), slice the windows, `torch.from_numpy(x.astype(np.int64))`. The windows are
the lm task's non-overlapping blocks of seq_len + 1 tokens, visited in DistributedSampler order
with the seed dtrain uses, so both sides train on the same samples. DDP, AdamW with the lm
task's weight decay, gradient clipping, backward, step. Rank 0 writes DIR/plain.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from workloads import SEED, WORKLOADS, build_task


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["lm"], default="lm")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the workload's)")
    parser.add_argument("--log-every", type=int, help="log the mean loss every N steps")
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True)")
    parser.add_argument("--out", required=True, help="folder for plain.jsonl")
    return parser.parse_args()


def get_batch(path: str, dtype: str, windows: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch, for the given windows instead of random offsets."""
    data = np.memmap(path, dtype=dtype, mode="r")
    n = seq_len + 1
    x = torch.stack([torch.from_numpy(data[i * n:i * n + seq_len].astype(np.int64)) for i in windows])
    y = torch.stack([torch.from_numpy(data[i * n + 1:i * n + n].astype(np.int64)) for i in windows])
    return x, y


def main() -> None:
    args = parse_args()
    workload = WORKLOADS[args.workload]
    steps, log_every = args.steps or workload.steps, args.log_every or workload.log_every
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    torch_dist.init_process_group("gloo")
    rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
    torch.manual_seed(SEED)
    task = build_task(workload)
    n_windows = len(task.train_dataset())  # the lm task holds the last windows out for eval
    path, dtype, seq_len = workload.task_args["train"], workload.task_args["dtype"], task.seq_len
    # seed: dtrain's epoch permutation is randperm seeded with seed * 100_003 + epoch.
    sampler = DistributedSampler(range(n_windows), shuffle=True, seed=SEED * 100_003, drop_last=True)
    model = DDP(task.model())
    defaults = task.config_defaults["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=workload.lr, weight_decay=defaults["weight_decay"])
    batch = workload.batch_per_rank

    out = open(os.path.join(args.out, "plain.jsonl"), "w") if rank == 0 else None
    step, epoch, window_loss, mean = 0, 0, torch.zeros(()), float("nan")
    while step < steps:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order) - batch + 1, batch):
            x, y = get_batch(path, dtype, order[start:start + batch], seq_len)
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), defaults["grad_clip"])
            optimizer.step()
            window_loss += loss.detach()
            step += 1
            if step % log_every == 0 or step == steps:
                window_loss /= log_every if step % log_every == 0 else step % log_every
                torch_dist.all_reduce(window_loss)
                mean, window_loss = (window_loss / world_size).item(), torch.zeros(())
                if out:
                    out.write(json.dumps({"step": step, "time": time.time(), "loss": mean}) + "\n")
                    out.flush()
            if step == steps:
                break
        epoch += 1
    if out:
        out.close()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
