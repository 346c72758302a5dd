"""Opt-in fixtures (``pytestmark = pytest.mark.usefixtures(...)``) for tensor-parallel tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.parallel import helpers


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from helpers.private_cache(tmp_path_factory.mktemp("lmserve-cache"))
