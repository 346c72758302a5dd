"""HTTP routes, one module per dialect, plus the management API. Each inference route reaches its
model through ``runtime_of(request, name)``."""

from __future__ import annotations

from fastapi import Request

from lmserve.server.registry import ModelRegistry
from lmserve.server.runtime import ModelRuntime


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry  # type: ignore[no-any-return]


def runtime_of(request: Request, name: str | None = None) -> ModelRuntime:
    """The model the request names (or the only one); 404 for an unknown name, listing the loaded."""
    return registry_of(request).pick(name)
