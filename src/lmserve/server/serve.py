"""Run the HTTP server until a signal, then drain: ``run_server(plan)``.

On the first SIGTERM or SIGINT the server keeps its port but answers 503 to new requests (``/ping``
too), lets requests in flight finish for up to ``graceful_shutdown_s``, aborts the rest (their
streams end with an error event), closes connections, stops the engine processes and returns 0.
A second signal stops at once. With ``fail_fast`` (``SERVING_FAIL_FAST``), a model given at start
that fails to load stops the server with exit code 1, so a supervisor restarts it, as DJL does.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from lmserve.server.app import create_app
from lmserve.server.loading import forbid_torch
from lmserve.server.policy import exposure_warnings
from lmserve.server.registry import ModelRegistry
from lmserve.server.runtime import LoadPlan, ModelRuntime, State

logger = logging.getLogger("lmserve.server")
_CLOSE_CONNECTIONS_S = 5  # after draining, how long responses still being written may take


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains every model before stopping."""

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry) -> None:
        super().__init__(config)
        self.registry = registry
        self._draining: asyncio.Task[None] | None = None
        self.failed_fast = False

    async def on_tick(self, counter: int) -> bool:
        failed = _failed_at_start(self.registry)
        if failed is not None and not self.failed_fast:
            logger.error("model %s failed to load and fail_fast is set: stopping the server", failed.name)
            self.failed_fast = self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is None and not self.should_exit:
            loop = asyncio.get_running_loop()  # signal handlers run on the loop's (main) thread
            loop.call_soon_threadsafe(self._start_draining)
            return
        super().handle_exit(sig, frame)  # second signal: uvicorn stops now
        self.force_exit = True

    def _start_draining(self) -> None:
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain(), name="drain")

    async def _drain(self) -> None:
        try:
            await self.registry.drain(self.registry.server.graceful_shutdown_s)
        finally:
            self.should_exit = True


def run_server(plan: LoadPlan, log_level: str = "info") -> int:
    """Serve ``plan``'s model (and those registered later) over HTTP until a signal; returns the
    process exit code."""
    forbid_torch()
    registry = ModelRegistry.serving(plan)
    server_config = plan.config.server
    for line in exposure_warnings(server_config):
        logger.warning("%s", line)
    config = uvicorn.Config(create_app(registry), host=server_config.host, port=server_config.port,
                            log_level=log_level, timeout_graceful_shutdown=_CLOSE_CONNECTIONS_S,
                            lifespan="on")  # fmt: skip
    server = DrainingServer(config, registry)
    server.run()
    return 0 if server.started and not server.failed_fast else 1


def _failed_at_start(registry: ModelRegistry) -> ModelRuntime | None:
    """A model given at start, with fail_fast, that failed before it ever served."""
    return next((rt for rt in registry.models if rt.loaded_at_startup and rt.config.workers.fail_fast
                 and rt.state is State.FAILED and not rt.ready_once), None)  # fmt: skip
