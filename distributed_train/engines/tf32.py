"""TF32 on CUDA (train.tf32): one switch for fp32 matmuls and cuDNN, set and read through one API.

torch (2.9 and later) has two APIs for this: the legacy switches (`set_float32_matmul_precision`,
`cudnn.allow_tf32`) and per-backend `fp32_precision` attributes. Mixing them raises: after a task
sets `torch.backends.cuda.matmul.fp32_precision`, `torch.get_float32_matmul_precision()` fails
("mix of the legacy and new APIs"). The legacy setters keep the new attributes current, so reading
and writing the new ones where they exist is right whichever API the task used."""

from __future__ import annotations

import torch


def _new_api() -> bool:
    backends = torch.backends
    parts = (backends, backends.cuda.matmul, backends.cudnn,
             getattr(backends.cudnn, "conv", None), getattr(backends.cudnn, "rnn", None))
    return all(hasattr(part, "fp32_precision") for part in parts)


def set_tf32(enabled: bool) -> None:
    """fp32 matmuls and cuDNN convolutions (and RNNs) on TF32 tensor cores, or all in full fp32.

    torch leaves matmuls in full fp32 by default (about 8x slower on A100/H100) but lets cuDNN use
    TF32: one switch for both, so fp32 means the same thing in every layer. CUDA only: the CPU's
    (oneDNN's) matmul precision is left as it is."""
    if _new_api():
        value = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value
        torch.backends.cudnn.rnn.fp32_precision = value
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _resolved(*chain: str) -> str:
    """The first setting in `chain` (most specific first) that is not "none" (inherit); "ieee" if all are."""
    for value in chain:
        if value != "none":
            return value
    return "ieee"


def tf32_enabled() -> bool:
    """fp32 runs on TF32 tensor cores somewhere: matmuls or cuDNN convolutions (on by default in
    torch), so an fp32 model is measured against the TF32 peak and MFU stays <= 1."""
    if not _new_api():
        return torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    backends = torch.backends
    top = backends.fp32_precision
    matmul = _resolved(backends.cuda.matmul.fp32_precision, top)  # no CUDA-wide level between them
    conv = _resolved(backends.cudnn.conv.fp32_precision, backends.cudnn.fp32_precision, top)
    return "tf32" in (matmul, conv)
