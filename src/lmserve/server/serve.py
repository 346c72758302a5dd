"""Run the HTTP server until a signal, then drain: ``run_server(plan)``.

On the first SIGTERM or SIGINT the server keeps its port but answers 503 to new requests (``/ping``
too), lets requests in flight finish for up to ``graceful_shutdown_s``, aborts the rest (their
streams end with an error event), closes connections, stops the engine processes and returns 0.
A second signal stops at once.
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
from lmserve.server.runtime import LoadPlan

logger = logging.getLogger("lmserve.server")
_CLOSE_CONNECTIONS_S = 5  # after draining, how long responses still being written may take


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains every model before stopping."""

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry) -> None:
        super().__init__(config)
        self.registry = registry
        self._draining: asyncio.Task[None] | None = None

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
    return 0 if server.started else 1
