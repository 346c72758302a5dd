"""HTTP routes, one module per dialect. Each reaches the model through ``runtime_of(request)``."""

from __future__ import annotations

from fastapi import Request

from lmserve.server.runtime import ModelRuntime


def runtime_of(request: Request) -> ModelRuntime:
    return request.app.state.runtime  # type: ignore[no-any-return]
