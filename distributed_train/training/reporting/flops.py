"""Model FLOPs utilisation: FLOPs per training sample and the device's peak FLOP/s.

MFU = (training FLOPs per sample x samples/s) / (peak FLOP/s per device x devices). The FLOPs come
from the task's `flops_per_sample()` or are counted once with torch.utils.flop_counter on a copy
of the model built on the meta device (no memory, no compute, the real model is untouched).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from distributed_train.batches import move_to_device
from distributed_train.engines.tf32 import tf32_enabled
from distributed_train.task import on_meta_device

log = logging.getLogger("distributed_train")

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' data sheets, by autocast dtype.
# "tf32" applies to fp32 training when TF32 is allowed (train.tf32), "fp32" when it is not.
# Keys are exact models as `gpu_model()` reads them from torch.cuda.get_device_name(): "L40" is
# not "L4", and an H200 NVL (a PCIe card) is not an H200 SXM. An unlisted GPU has no MFU unless
# log.peak_tflops gives its peak.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GB200": {"bf16": 2500, "fp16": 2500, "tf32": 1250, "fp32": 80},
    "B200": {"bf16": 2250, "fp16": 2250, "tf32": 1100, "fp32": 75},
    "H200": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},  # SXM
    "H200 NVL": {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60},
    "H100": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},  # SXM
    "H100 NVL": {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60},
    "H100 PCIe": {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51},
    "H800": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},  # SXM
    "H800 PCIe": {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51},
    "GH200": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
    "A100": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},  # SXM
    "A100 PCIe": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
    "A800": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
    "A800 PCIe": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
    "L40S": {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6},
    "L40": {"bf16": 181, "fp16": 181, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3},
    "A10": {"bf16": 125, "fp16": 125, "tf32": 62.5, "fp32": 31.2},
    "RTX 4090": {"bf16": 165, "fp16": 165, "tf32": 82.6, "fp32": 82.6},
    "RTX 3090": {"bf16": 71, "fp16": 71, "tf32": 35.6, "fp32": 35.6},
    "V100": {"fp16": 125, "fp32": 15.7},  # SXM2
    "V100 PCIe": {"fp16": 112, "fp32": 14},
    "T4": {"fp16": 65, "fp32": 8.1},
}
_BRANDS = {"NVIDIA", "TESLA", "GEFORCE"}


def gpu_model(name: str) -> str:
    """The table key for a device name: the model, and the form factor where it changes the peak.

    'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA A100-SXM4-80GB' -> 'A100', 'NVIDIA H200 NVL' ->
    'H200 NVL', 'NVIDIA GeForce RTX 4090' -> 'RTX 4090', 'Tesla V100-PCIE-32GB' -> 'V100 PCIe'."""
    words = [w for w in re.split(r"[\s\-]+", name.strip()) if w and w.upper() not in _BRANDS]
    if not words:
        return ""
    model = words[0].upper()
    rest = [w.upper() for w in words[1:]]
    if model == "RTX" and rest:
        model, rest = f"RTX {rest[0]}", rest[1:]
    if "NVL" in rest:
        return f"{model} NVL"
    if "PCIE" in rest:
        return f"{model} PCIe"
    return model


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for this precision, or None when unknown (CPUs, unlisted GPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None  # CPU peaks depend on cores, clocks and ISA: no honest table exists
    return peak_flops_for_name(torch.cuda.get_device_name(device), precision, tf32_enabled())


def peak_flops_for_name(name: str, precision: str, tf32: bool) -> float | None:
    """Table lookup by exact GPU model; fp32 uses the TF32 peak when TF32 is allowed."""
    key = "tf32" if precision == "fp32" and tf32 else precision
    value = PEAK_TFLOPS.get(gpu_model(name), {}).get(key)
    return value * 1e12 if value else None


def task_flops_per_sample(task: Any, dataset: Any, collate: Any, samples: int = 2) -> float | None:
    """Training FLOPs (forward + backward) per sample: declared by the task, else counted once."""
    declared = task.flops_per_sample()
    if declared:
        return float(declared)
    try:
        return count_flops_per_sample(task, dataset, collate, samples)
    except Exception as exc:  # noqa: BLE001 - data-dependent models cannot run on meta: no MFU
        log.debug("could not count FLOPs on the meta device (%s: %s); mfu is not logged",
                  type(exc).__name__, exc)
        return None


def count_flops_per_sample(task: Any, dataset: Any, collate: Any, samples: int = 2) -> float | None:
    """Count matmul/conv/attention FLOPs of forward + backward on a meta-device copy of the model."""
    from torch.utils.data import default_collate
    from torch.utils.flop_counter import FlopCounterMode

    samples = min(samples, len(dataset))
    batch = (collate or default_collate)([dataset[i] for i in range(samples)])
    batch = move_to_device(batch, torch.device("meta"))
    with on_meta_device():
        model = task.model()
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        task.loss(model, batch).backward()
    total = counter.get_total_flops()
    return total / samples if total > 0 else None


def mfu(flops_per_sample: float | None, samples_per_s: float, peak_per_device: float | None,
        devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when either number is unknown."""
    if not flops_per_sample or not peak_per_device:
        return None
    return flops_per_sample * samples_per_s / (peak_per_device * devices)


class MFUMeter:
    """MFU of a run: the FLOPs and the device peak are looked up once, at the first log step."""

    def __init__(self, task: Any, dataset: Any, collate: Any, device: torch.device, precision: str,
                 world_size: int, peak_tflops: float | None = None):
        self.task, self.dataset, self.collate = task, dataset, collate
        self.device, self.precision, self.world_size, self.peak_tflops = device, precision, world_size, peak_tflops
        self._known: tuple[float | None, float | None] | None = None

    def __call__(self, samples_per_s: float) -> float | None:
        if self._known is None:
            peak = peak_flops(self.device, self.precision, self.peak_tflops)
            # No peak, no MFU: skip counting FLOPs (CPU runs pay nothing).
            per_sample = task_flops_per_sample(self.task, self.dataset, self.collate) if peak else None
            self._known = (per_sample, peak)
        per_sample, peak = self._known
        return mfu(per_sample, samples_per_s, peak, self.world_size)
