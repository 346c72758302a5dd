"""Shared by the tensor-parallel, model-family and converter tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import share_cache_parts


def private_cache(path: Path) -> Iterator[Path]:
    """Point the lmserve cache (conversions included) at ``path`` for the duration, sharing the
    current cache's compiled kernels and fetched models so nothing is built or fetched twice."""
    from lmserve.cache import cache_root

    share_cache_parts(cache_root(), path)
    patch = pytest.MonkeyPatch()
    patch.setenv("LMSERVE_CACHE", str(path))
    yield path
    patch.undo()


def close(llm: Any) -> None:
    """Stop a tensor-parallel group's workers (a single-rank runner has nothing to stop)."""
    llm.engine.runner.shutdown()
