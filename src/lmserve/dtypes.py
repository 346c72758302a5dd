"""The dtypes lmserve stores weights and the KV cache in: one table of names for configuration,
the converter's manifests and the model loader.

Configuration checks names without importing torch (the frontend never does); torch is imported only
when a name becomes a ``torch.dtype``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmserve.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # lmserve name: torch's
ALIASES: dict[str, str] = {**{name: name for name in DTYPES}, **{torch_name: name for name, torch_name in DTYPES.items()}}


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` for ``"bf16"`` (a ``torch.dtype`` is returned as it is)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UnsupportedModelError(f"dtype {dtype!r} cannot be converted to; supported: {', '.join(DTYPES)}")
    result: torch.dtype = getattr(torch, DTYPES[dtype])
    return result


def dtype_name(dtype: torch.dtype) -> str:
    """``"bf16"`` for ``torch.bfloat16``: the name manifests and cache entries use."""
    name = ALIASES.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise UnsupportedModelError(f"cannot store weights as {dtype}; supported: {', '.join(DTYPES)}")
    return name
