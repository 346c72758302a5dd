"""The device a model runs on and the dtype it stores weights in, from their configuration names.

Serving and the converter both resolve ``auto`` here, so a conversion made ahead of time is the one
serving looks for.
"""

from __future__ import annotations

import torch

from lmserve.dtypes import torch_dtype
from lmserve.kernels.ops import get_ops


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when a device is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the device computes with it well (CUDA with bf16, CPUs with our kernels)."""
    if name != "auto":
        return torch_dtype(name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if get_ops(device).fast_bf16 else torch.float32
