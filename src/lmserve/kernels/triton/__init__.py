"""Triton kernels for the CUDA path. Importing this package needs ``triton``; ``available()`` says
whether it can be used, so callers can fall back to the pure-torch ops without importing it."""

from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    """Triton is installed and not switched off with ``LMSERVE_TRITON=0``."""
    if os.environ.get("LMSERVE_TRITON", "1") == "0":
        return False
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
