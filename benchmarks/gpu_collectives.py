"""The NCCL paths a single GPU can exercise, run as world size 1 under torchrun.

    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_collectives.py [--backend nccl]

dtrain skips collectives when it is alone, so this calls them itself: DDP forced on (gradients
equal to the unwrapped model's), all_reduce / broadcast_object / all_gather_object / barrier,
the stop vote (an asynchronous all-reduce read back through pinned memory) and the checkpoint
copy to pinned CPU memory. Prints one line per check; exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_train.batches import to_cpu_copy  # noqa: E402
from distributed_train.distributed.preemption import _PendingVote  # noqa: E402


def check(name: str, ok: bool) -> None:
    print(f"{'ok' if ok else 'FAILED'}: {name}", flush=True)
    if not ok:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="nccl")
    backend = parser.parse_args().backend
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
    twin = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
    twin.load_state_dict(model.state_dict())
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    x, y = torch.randn(32, 64, device=device), torch.randint(0, 10, (32,), device=device)
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    check("DDP backward (gradient all-reduce on the backend)",
          all(torch.allclose(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters())))

    total = torch.full((3,), 2.0, dtype=torch.float64, device=device)
    torch_dist.all_reduce(total)
    check("all_reduce", total.tolist() == [2.0, 2.0, 2.0])
    box = [{"run_dir": "runs/x"}]
    torch_dist.broadcast_object_list(box, src=0)
    gathered = [None]
    torch_dist.all_gather_object(gathered, {"rank": 0})
    check("broadcast_object_list / all_gather_object", box[0] == {"run_dir": "runs/x"} and gathered == [{"rank": 0}])
    torch_dist.barrier()
    check("barrier", True)

    cases = [(0, 7, False), (2, 1, True), (1, 40, False)]  # (stop code, steps to the next vote, save due)
    votes = [_PendingVote(code, interval, due, device) for code, interval, due in cases]
    check("stop vote (asynchronous all-reduce, read through pinned memory)", [v.result() for v in votes] == cases)

    from distributed_train.training.checkpoints.staging import Stager

    stager, params = Stager(), dict(model.named_parameters())
    first = stager.stage({"model": params})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    second = stager.stage({"model": params})
    check("checkpoint staging (pinned host buffers on CUDA, reused by the next save)",
          all(t.device.type == "cpu" for t in second["model"].values())
          and all(first["model"][k].data_ptr() == second["model"][k].data_ptr() for k in params)
          and all(torch.equal(second["model"][k], p.detach().cpu()) for k, p in params.items())
          and (device.type != "cuda" or all(t.is_pinned() for t in second["model"].values())))

    state = {"model": model.state_dict(), "step": 3, "rng": [torch.arange(4, device=device)]}
    copy = to_cpu_copy(state)
    tensors = [*copy["model"].values(), *copy["rng"]]
    check("checkpoint copy to CPU (pinned, one synchronize)",
          all(t.device.type == "cpu" for t in tensors)
          and all(torch.equal(copy["model"][k], v.cpu()) for k, v in model.state_dict().items()))
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
