"""The FSDP2 loop a user would write without this project: plain_ddp.py with `fully_shard` on
every block of the model's ModuleLists, then on the whole model, instead of DDP.

    torchrun --standalone --nproc-per-node 2 benchmarks/plain_fsdp.py --workload charlm --out DIR

Same task, data order, optimizer and steps as plain_ddp.py (and as `dtrain --engine=fsdp`).
"""

from __future__ import annotations

import torch
from plain_ddp import main
from torch import nn
from torch.distributed.fsdp import fully_shard


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """fully_shard per block (the children of every ModuleList), then the root: the FSDP2 recipe."""
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)
    return model


if __name__ == "__main__":
    torch.manual_seed(0)
    main(wrap=shard, unwrap=lambda model: model)
