"""Shared test fixtures: tiny models, the default model, and markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import build_tokenizer


def _use_triton_interpreter() -> None:
    """Without a CUDA device the Triton kernels are tested in Triton's interpreter, which must be
    chosen before triton is first imported (it decorates its own library functions then), so here,
    before any test module imports it. With a device they run compiled."""
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_use_triton_interpreter()

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny byte-level BPE tokenizer with a chat template."""
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model, fetched into the user's lmserve cache on first use (like ``make serve``)."""
    from lmserve.store.default_model import pull_default_model

    return pull_default_model(progress=False)


SHARED_CACHE_PARTS = ("models", "kernels")  # expensive to make, safe to share between caches


def share_cache_parts(source_root: Path, target_root: Path) -> None:
    """Link ``target_root``'s fetched models and compiled kernels to ``source_root``'s."""
    target_root.mkdir(parents=True, exist_ok=True)
    for part in SHARED_CACHE_PARTS:
        (source_root / part).mkdir(parents=True, exist_ok=True)
        link = target_root / part
        if not link.exists():
            link.symlink_to(source_root / part, target_is_directory=True)


@pytest.fixture(autouse=True, scope="session")
def _test_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests write conversions and extracted archives into a throw-away cache, never the user's;
    the default model and the compiled kernels are shared with the user's cache, so a second run
    neither downloads nor compiles again. Set in os.environ so spawned processes see it too."""
    from lmserve.cache import cache_root

    user_root = cache_root()
    test_root = tmp_path_factory.mktemp("lmserve-cache")
    share_cache_parts(user_root, test_root)
    os.environ["LMSERVE_CACHE"] = str(test_root)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
