"""The FastAPI application: every route on one app, the error table, body limit and metrics.

``create_app(runtime)`` returns the app; loading starts in the background when it starts, so the
port answers (``/ping`` 503) while the model loads. Importing this module imports no torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lmserve import __version__
from lmserve.server.errors import install_error_handlers
from lmserve.server.middleware import BodyLimitMiddleware, MetricsMiddleware
from lmserve.server.routes import health, openai_chat, openai_completions, sagemaker, tgi
from lmserve.server.runtime import ModelRuntime


def create_app(runtime: ModelRuntime) -> FastAPI:
    """The HTTP app serving ``runtime``'s model; it loads the model on startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(runtime.load(), name="load-model")
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await runtime.shutdown()

    app = FastAPI(title="lmserve", version=__version__, lifespan=lifespan,
                  description="LLM inference server: SageMaker/LMI, TGI and OpenAI dialects.")  # fmt: skip
    app.state.runtime = runtime
    install_error_handlers(app, lambda: runtime.config.server.queue_full_status)
    for module in (health, sagemaker, tgi, openai_completions, openai_chat):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: runtime.config.server.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)  # outermost: sees 413s too
    return app
