"""The FastAPI application: every route on one app, the error table, token check, body limit, metrics.

``create_app(registry)`` returns the app; the startup models load in the background when it starts,
so the port answers (``/ping`` 503) while they load. Importing this module imports no torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from lmserve._version import __version__
from lmserve.server.errors import install_error_handlers
from lmserve.server.middleware import BodyLimitMiddleware, MetricsMiddleware, TokenAuthMiddleware
from lmserve.server.registry import ModelRegistry
from lmserve.server.routes import (
    health,
    management,
    openai_chat,
    openai_completions,
    openai_embeddings,
    sagemaker,
    sagemaker_runtime,
    tgi,
)


def create_app(registry: ModelRegistry) -> FastAPI:
    """The HTTP app serving ``registry``'s models; it loads the startup models on startup and stops
    every model on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(registry.load_startup_models(), name="load-models")
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await registry.shutdown()

    app = _App(title="lmserve", version=__version__, lifespan=lifespan,
                  description="LLM inference server: SageMaker/LMI, TGI and OpenAI dialects.")  # fmt: skip
    app.state.registry = registry
    install_error_handlers(app, lambda: registry.server.queue_full_status)
    for module in (health, sagemaker, sagemaker_runtime, tgi, openai_completions, openai_chat, openai_embeddings,
                   management):
        app.include_router(module.router)
    app.router.routes[:0] = sagemaker.direct_routes()  # first: matched before any FastAPI route
    app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: registry.server.max_request_bytes)
    app.add_middleware(TokenAuthMiddleware, server=lambda: registry.server)
    app.add_middleware(MetricsMiddleware, metrics=registry.metrics)  # outermost: sees 401s and 413s too
    return app


class _App(FastAPI):
    """Routes that read their body by hand (a handler model takes any body) still publish its schema."""

    def openapi(self) -> dict[str, Any]:
        schema = super().openapi()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, body in sagemaker.openapi_schemas().items():
            schemas.setdefault(name, body)
        return schema
