"""The margin of the cross-configuration exactness tests, measured: `python3 tests/margin.py`.

The tests that compare training results across world sizes and engines train in float64
(`helpers.FP64`) and allow `helpers.EXACT`. This prints, for two of their jobs (the toy regression
with SGD, the 2-block GPT with AdamW and clipping), the largest parameter difference against one
process for 2 and 3 ranks under ddp and fsdp, and what two real defects give on 2 ranks:

- `no all-reduce`: every rank steps on its own gradient (gradient averaging removed);
- `summed`: the gradients are summed across ranks instead of averaged (AdamW hardly sees it: its
  step is invariant to the gradient's scale, up to eps; SGD steps twice as far).

Both defects come from a DDP communication hook, DDP's public seam for the gradient all-reduce.
It exits 1 unless EXACT sits at least 100x above every difference and 100x below the defect that
each task's tests must catch (`no all-reduce` for both; `summed` for SGD). `--precision=fp32`
prints the same table for float32 jobs (no check: that is what the tests no longer rely on).
tests/distributed/test_margin.py runs the same check in the suite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # `python3 tests/margin.py` from anywhere: this checkout first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import EXACT, REPO, fresh_port, max_diff, run_ranks  # noqa: E402

TOY = str(REPO / "tests" / "tasks" / "toy.py")
TASKS = {  # the jobs of test_equivalence.py and test_fsdp.py
    "regression, SGD": [f"--task={TOY}:Regression", "--train.batch_size=24", "--train.max_steps=6",
                        "--train.optimizer=sgd", "--train.lr=0.05", "--seed=3", "--eval.every_steps=0"],
    "gpt, AdamW": ["--task=charlm", "--task_args.n_layer=2", "--task_args.d_model=32", "--task_args.n_head=2",
                   "--task_args.ctx=16", "--train.batch_size=12", "--train.max_steps=4", "--train.lr=0.01",
                   "--train.grad_clip=1.0", "--seed=1", "--eval.every_steps=0"],
}
CONFIGURATIONS = {  # world size -> the jobs of one spawn: (name, extra overrides, defect)
    2: [("ddp", [], None), ("fsdp", ["--engine=fsdp"], None),
        ("ddp, no all-reduce (defect)", ["--ddp.shm_allreduce=never"], "local"),
        ("ddp, summed (defect)", ["--ddp.shm_allreduce=never"], "summed")],
    3: [("ddp", [], None), ("fsdp", ["--engine=fsdp"], None)],
}
MARGIN = 100


def _local_hook(state, bucket):
    """Each rank keeps its own gradient: nothing is all-reduced."""
    import torch

    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _summed_hook(state, bucket):
    """The ranks' gradients summed, not averaged."""
    import torch.distributed as torch_dist

    work = torch_dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def _jobs_in_rank(rank: int, world_size: int, jobs: list, ports: str) -> dict | None:
    """Each (name, overrides, defect) job in turn, on a port picked through the folder `ports`; a
    defect is a comm hook on the engine's DDP model."""
    import os

    from distributed_train.training import trainer
    from tests.helpers import train_in_rank

    build_engine, out = trainer.build_engine, {}
    for index, (name, overrides, defect) in enumerate(jobs):
        def build_with_defect(*args, defect=defect, **kwargs):
            engine = build_engine(*args, **kwargs)
            if defect:
                engine.model.register_comm_hook(None, _local_hook if defect == "local" else _summed_hook)
            return engine

        os.environ["MASTER_PORT"] = str(fresh_port(rank, Path(ports), str(index)))
        trainer.build_engine = build_with_defect
        try:
            out[name] = train_in_rank(rank, world_size, overrides)["state"]
        finally:
            trainer.build_engine = build_engine
    return out if rank == 0 else None


def _spawn(world_size: int, jobs: list) -> dict:
    with tempfile.TemporaryDirectory(prefix="dtrain-ports-") as ports:
        return run_ranks(_jobs_in_rank, world_size, jobs, ports)[0]


def measure(tmp: Path, precision: str = "fp64") -> list[tuple[str, str, float]]:
    """(task, configuration, largest parameter difference against one process) for every job."""
    rows = []
    for task, job in TASKS.items():
        base = [f"--train.precision={precision}", *job]
        reference = _spawn(1, [("one process", [*base, f"--run_dir={tmp}/{task}/1"], None)])["one process"]
        for world_size, configurations in CONFIGURATIONS.items():
            jobs = [(f"{task}/{world_size}/{name}", [*base, *extra, f"--run_dir={tmp}/{task}/{world_size}/{name}"],
                     defect) for name, extra, defect in configurations]
            states = _spawn(world_size, jobs)
            rows += [(task, f"{world_size} ranks, {name}", max_diff(states[f"{task}/{world_size}/{name}"], reference))
                     for name, _, _ in configurations]
    return rows


def problems(rows: list[tuple[str, str, float]]) -> list[str]:
    """Where EXACT is not MARGIN x away from a difference, or from a defect the tests must catch."""
    out = []
    for task, configuration, diff in rows:
        if "(defect)" not in configuration and diff * MARGIN > EXACT:
            out.append(f"{task}, {configuration}: {diff:.1e} is not {MARGIN}x below EXACT={EXACT:g}")
        must_catch = "no all-reduce" in configuration or ("summed" in configuration and "SGD" in task)
        if must_catch and diff < MARGIN * EXACT:
            out.append(f"{task}, {configuration}: {diff:.1e} is not {MARGIN}x above EXACT={EXACT:g}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp64", "fp32"], default="fp64")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dtrain-margin-") as tmp:
        rows = measure(Path(tmp), args.precision)
    print(f"largest parameter difference against one process ({args.precision}); EXACT = {EXACT:g}")
    print(f"{'task':<16} {'configuration':<38} {'difference':>10} {'/ EXACT':>9}")
    for task, configuration, diff in rows:
        print(f"{task:<16} {configuration:<38} {diff:>10.1e} {diff / EXACT:>9.1e}")
    if args.precision != "fp64":
        return 0
    found = problems(rows)
    print("\n".join(found) if found else f"margin: EXACT is at least {MARGIN}x from every difference and defect")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
