"""Shared test fixtures: tiny models, the default model, and markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import build_tokenizer


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


@pytest.fixture(autouse=True, scope="session")
def _quiet_tokenizers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
