"""No host sync in the hot loop. On a GPU, a call that reads a device tensor on the host (`.item()`,
`.tolist()`, `.cpu()`, `.numpy()`, `bool()`/`float()`/`int()` of a tensor) or waits for the device
(`torch.cuda.synchronize`, an event's or a stream's `synchronize`/`wait`) stops the host from
queueing work ahead. Counted here on CPU, per training step, for every such call this project's
code makes (the task's and torch's own are theirs: torch's optimizers read their step counters,
which are CPU tensors on a GPU too), under ddp and fsdp, with and without accumulation:

- the training step itself (fetch, forward, backward, optimizer): none, on every step;
- after a step: none, except the documented ones: on log steps the window's loss (one `tolist`,
  after the all-reduce) and the grad norm (one `item`); on checkpoint steps the NaN check's loss
  (the same `tolist`; none more when the step was logged) while the save's copies to the host are
  torch's stager's (the checkpoint itself); on evaluation steps the evaluation's one `tolist`; on
  vote steps (every ~50 ms of steps) the stop vote's six numbers, launched a vote earlier
  (`tolist` of a pinned host copy behind an event on a GPU: it waits for that vote only).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import REPO, fresh_port, run_ranks, train_in_rank

pytestmark = pytest.mark.distributed

TENSOR_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
OURS = os.sep + "distributed_train" + os.sep
STEPS, LOG, EVAL, SAVE = 24, 8, 12, 10
# Calls on tensors that live on the CPU on every device (no device work to wait for):
HOST_ONLY = {
    "tolist data.py:__iter__",  # the sampler's index permutation (a CPU generator's)
}


def _counting_job(rank: int, world_size: int, tmp: str, engine: str, micro: int, task: str) -> list[tuple]:
    import torch

    from distributed_train.training.trainer import Trainer

    where = {"step": 0, "phase": "setup"}
    calls: list[tuple] = []

    def counted(name: str, original, caller_depth: int = 1):
        def call(*args, **kwargs):
            frame = sys._getframe(caller_depth)
            if frame.f_code.co_name == "reduce_and_read":  # the checked all-reduce: named by its caller
                frame = frame.f_back
            site = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
            if OURS in frame.f_code.co_filename and f"{name} {site}" not in HOST_ONLY:
                calls.append((where["step"], where["phase"], name, site))
            return original(*args, **kwargs)
        return call

    for name in TENSOR_READS:
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    torch.cuda.synchronize = counted("synchronize", torch.cuda.synchronize)
    for cls, method in ((torch.cuda.Event, "synchronize"), (torch.cuda.Event, "wait"),
                        (torch.cuda.Stream, "synchronize")):
        setattr(cls, method, counted(f"{cls.__name__}.{method}", getattr(cls, method)))

    def phase(name: str, original, step_offset: int):
        def run(self):
            where["step"], where["phase"] = self.global_step + step_offset, name
            try:
                return original(self)
            finally:
                where["phase"] = "between"
        return run

    Trainer.train_step = phase("step", Trainer.train_step, 1)
    Trainer.after_step = phase("after", Trainer.after_step, 0)
    os.environ["MASTER_PORT"] = str(fresh_port(rank, Path(tmp), f"{engine}-{micro}"))
    train_in_rank(rank, world_size, [f"--task={task}",
                                     f"--engine={engine}", "--train.batch_size=16", f"--train.micro_batch_size={micro}",
                                     f"--train.max_steps={STEPS}", f"--log.every_steps={LOG}",
                                     f"--eval.every_steps={EVAL}", f"--checkpoint.every_steps={SAVE}",
                                     f"--run_dir={tmp}/{engine}-{micro}"])
    return calls


REGRESSION, TOKENS = f"{REPO / 'tests' / 'tasks' / 'toy.py'}:Regression", "tests.tasks.third_party:PaddedTokens"


# PaddedTokens: a loss given as (sum, count), divided by the count all-reduced over the ranks.
@pytest.mark.parametrize("engine, micro, task", [("ddp", 8, REGRESSION), ("ddp", 4, REGRESSION),
                                                 ("fsdp", 8, REGRESSION), ("fsdp", 4, REGRESSION),
                                                 ("ddp", 4, TOKENS), ("fsdp", 4, TOKENS)])
def test_no_host_sync_in_the_training_step_and_only_the_documented_ones_after_it(tmp_path, engine, micro, task):
    for rank, calls in enumerate(run_ranks(_counting_job, 2, str(tmp_path), engine, micro, task)):
        hot = [call for call in calls if call[1] == "step"]
        assert hot == [], f"rank {rank}: host syncs inside the training step: {hot}"
        after = [call for call in calls if call[1] == "after" and call[0] <= STEPS]
        by_step: dict[int, Counter] = {}
        for step, _, name, site in after:
            by_step.setdefault(step, Counter())[f"{name} {site}"] += 1
        vote = "tolist preemption.py:result"
        for step in range(1, STEPS + 1):
            found = by_step.get(step, Counter())
            assert found.pop(vote, 0) <= 1, f"rank {rank}, step {step}: more than one vote read"
            expected = Counter()
            if step % LOG == 0 or step == STEPS:
                expected.update({"tolist step_metrics.py:global_loss": 1, "item step_metrics.py:log": 1})
            logged = step % LOG == 0 or step == STEPS
            if (step % SAVE == 0 or step == STEPS) and not logged:  # the NaN check (a log step checked already)
                expected.update({"tolist step_metrics.py:global_loss": 1})
            if step % EVAL == 0 and step != STEPS:  # the final evaluation comes after the loop
                expected.update({"tolist evaluation.py:reduce": 1})
            assert found == expected, f"rank {rank}, step {step}: {dict(found)} != documented {dict(expected)}"
