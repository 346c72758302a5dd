"""Where lmserve keeps what it fetches, converts and compiles."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The lmserve cache directory: ``$LMSERVE_CACHE``, else ``~/.cache/lmserve``. Created on demand."""
    root = Path(os.environ.get("LMSERVE_CACHE") or Path.home() / ".cache" / "lmserve").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_subdir(name: str) -> Path:
    """A named subdirectory of the cache root (``models``, ``converted``, ``kernels`` ...)."""
    path = cache_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
