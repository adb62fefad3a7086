"""Where a language-model run computes: the device and the autocast dtype that a config asks for and this machine has.

``precision: auto`` takes bfloat16 autocast (over float32 weights) only where the hardware has fast bfloat16 matrix
products: CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX (about 3x float32 there). Elsewhere bfloat16 would
be emulated, slower and less precise, so auto stays in float32.
"""

from __future__ import annotations

from typing import Any

import torch

from policygrad.errors import UsageError

__all__ = ["cpu_has_bf16_matmul", "fused_adamw_supported", "resolve_device", "use_threads"]


def resolve_device(config: Any) -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None for full float32) for ``config.device`` and ``config.precision``."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device", f"{config.device} was asked for but CUDA is not available here")
    if config.precision == "float32":
        return device, None
    if config.precision == "bfloat16":
        return device, torch.bfloat16
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16_matmul()
    return device, torch.bfloat16 if fast else None


def use_threads(config: Any) -> int:
    """Run torch on ``config.threads`` CPU threads (None: one per idle core, :mod:`policygrad.threads`) and return the
    count. Every command that computes with a model calls it: the thread count can change how a kernel splits its
    sums, so a held-out evaluation is only comparable with another run at the same count (docs/results.md,
    "Evaluation and batching")."""
    from policygrad.threads import set_threads

    return set_threads(config.threads)


def cpu_has_bf16_matmul() -> bool:
    """Whether oneDNN reports native bfloat16 matrix products on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def fused_adamw_supported(device: torch.device) -> bool:
    """torch's fused AdamW runs on CPU and CUDA (float32 weights, as ours are)."""
    return device.type in ("cpu", "cuda")
