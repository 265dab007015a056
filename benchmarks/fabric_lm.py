"""Lightning Fabric's plain training loop on the same language model, data, batch, optimizer and
precision as a `dtrain train --task=lm` run: the side-by-side tokens/s of the GPU acceptance
script (benchmarks/gpu_check.sh).

    python benchmarks/fabric_lm.py --steps 60 --batch-size 32 [--precision bf16] [--task-arg k=v ...]

The model and the token windows come from dtrain's own lm task (the same GPT, the same file), so
only the loop differs: Fabric's `setup`, `backward` and AdamW's step, samples drawn in order.
Prints one JSON line: {"tokens_per_s", "steps", "loss_first", "loss_last", "peak_mem_gib"}. The
rate is measured over the steps after the first 10 (warm-up), with the device synchronised at
both ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_train.config import load_config  # noqa: E402
from distributed_train.task import load_task  # noqa: E402

FABRIC_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}
WARMUP = 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--precision", choices=sorted(FABRIC_PRECISION), default="bf16")
    parser.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="the lm task's arguments, as dtrain's --task_args.KEY=VALUE")
    args = parser.parse_args()
    from lightning.fabric import Fabric

    config = load_config(None, ["--task=lm", *(f"--task_args.{arg}" for arg in args.task_arg)])
    task = load_task(config.task, config)
    fabric = Fabric(accelerator="cuda" if torch.cuda.is_available() else "cpu", devices=1,
                    precision=FABRIC_PRECISION[args.precision])
    fabric.seed_everything(0)
    model = task.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)
    data = task.train_dataset()
    losses, start = [], None
    for step in range(args.steps):
        if step == min(WARMUP, args.steps - 1):
            _sync(fabric)
            start = time.perf_counter()
        first = (step * args.batch_size) % max(1, len(data) - args.batch_size)
        batch = torch.utils.data.default_collate([data[i] for i in range(first, first + args.batch_size)])
        batch = fabric.to_device(batch)
        loss = task.loss(model, batch)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    _sync(fabric)
    timed_steps = args.steps - min(WARMUP, args.steps - 1)
    rate = timed_steps * args.batch_size * task.tokens_per_sample / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps({"tokens_per_s": rate, "steps": args.steps, "loss_first": losses[0].item(),
                      "loss_last": losses[-1].item(), "peak_mem_gib": peak}))
    return 0


def _sync(fabric) -> None:
    if fabric.device.type == "cuda":
        torch.cuda.synchronize(fabric.device)


if __name__ == "__main__":
    sys.exit(main())
