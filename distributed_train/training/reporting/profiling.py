"""Profile mode (`train.profile_steps=N`): a torch.profiler trace of N training steps per rank.

The first step this process runs is left out (one-off costs: allocator warm-up, DDP's first
bucket rebuild, lazy imports); the next N steps are recorded, data loading between them included.
Each rank writes run_dir/profile/trace_rank<R>.json (open it in https://ui.perfetto.dev or
chrome://tracing) and top_ops_rank<R>.txt, the operators sorted by their own time. Recorded
steps run slower, so the samples/s logged while profiling is not the run's real speed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distributed_train.training.reporting.metrics import log


class StepProfiler:
    """Records `steps` optimizer steps after the first one; `step()` is called after every step."""

    def __init__(self, steps: int, run_dir: Path, rank: int, device: torch.device):
        self.steps, self.rank, self.device = steps, rank, device
        self.folder = Path(run_dir) / "profile"
        self.profile: torch.profiler.profile | None = None
        self.recorded = 0
        self.done = steps == 0

    def step(self, global_step: int, total_steps: int) -> None:
        """Start after the first step, count recorded steps, write the files after the last one."""
        if self.done:
            return
        if self.profile is None:
            if global_step >= total_steps:
                self.done = True
                log.warning("train.profile_steps: no step left to profile after the first; raise train.max_steps")
                return
            self._start()
            return
        self.recorded += 1
        if self.recorded == self.steps or global_step >= total_steps:
            self._finish()
        else:
            self.profile.step()  # closes span ProfilerStep#k, opens the next one

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # A schedule that always records makes the profiler mark each step (ProfilerStep#k): one
        # cycle, kept whole (acc_events; without it torch 2.11 warns that cycles are cleared).
        self.profile = torch.profiler.profile(activities=activities, record_shapes=True, acc_events=True,
                                              schedule=lambda step: torch.profiler.ProfilerAction.RECORD)
        self.profile.start()

    def _finish(self) -> None:
        """Stop recording and write the trace and the operator table of this rank."""
        assert self.profile is not None
        self.profile.stop()
        self.done = True
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"trace_rank{self.rank}.json"
        self.profile.export_chrome_trace(str(trace))
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.profile.key_averages().table(sort_by=sort_by, row_limit=40)
        header = f"{self.recorded} training steps on rank {self.rank}, operators by own time ({sort_by})\n"
        (self.folder / f"top_ops_rank{self.rank}.txt").write_text(header + table + "\n")
        self.profile = None
        log.info("profile of %d steps written to %s (open trace_rank*.json in ui.perfetto.dev)",
                 self.recorded, self.folder)
