"""Fixtures for engine-process tests: a tiny tokenizer directory and fake-engine specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lmserve.config.settings import EngineConfig
from lmserve.workers.messages import EngineSpec
from tests.server.fake_engine import FakeEngine
from tests.server.tiny_tokenizer import build_tiny_tokenizer

FAKE_FACTORY = f"{FakeEngine.__module__}:FakeEngine"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def fake_spec(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """``fake_spec(**options)``: an engine spec for the fake engine with those options."""

    def make(max_model_len: int = 64, block_size: int = 4, **options: Any) -> EngineSpec:
        config = EngineConfig(model=str(tiny_model_dir), max_model_len=max_model_len, block_size=block_size,
                              max_num_seqs=8)  # fmt: skip
        return EngineSpec(FAKE_FACTORY, config, options)

    return make
