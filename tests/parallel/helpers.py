"""Shared by the tensor-parallel, model-family and converter tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmserve.kernels import ops as kernel_ops


def reference_kernels() -> Iterator[None]:
    """Run on the pure-torch kernels: the compiled CPU GEMM multiplies by bf16-packed weights even
    for fp32 models (logits differ from fp32 by ~1e-2), which random tiny models' near-ties turn into
    different greedy tokens. Spawned ranks inherit the environment variable."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LMSERVE_CPU_KERNELS", "0")
    patch.setattr(kernel_ops, "_by_device_type", {})
    yield
    patch.undo()


def private_cache(path: Path) -> Iterator[Path]:
    """Point the lmserve cache (conversions included) at ``path`` for the duration."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LMSERVE_CACHE", str(path))
    yield path
    patch.undo()


def close(llm: Any) -> None:
    """Stop a tensor-parallel group's workers (a single-rank runner has nothing to stop)."""
    shutdown = getattr(llm.engine.runner, "shutdown", None)
    if shutdown is not None:
        shutdown()
