"""``ModelRuntime``: the served model's lifecycle, from loading through draining to shutdown.

The HTTP port opens before loading starts, so health checks see 503 until the model is ready.
Loading runs four timed phases, one log line each: resolve (fetch the model), config (rebuild the
configuration with the model's ``serving.properties``), tokenizer, engine (spawn the replicas and
wait for them within ``model_loading_timeout``). A failure leaves the runtime ``FAILED``: ``/ping``
answers 500 and inference routes 503, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmserve.config.settings import ServingConfig
from lmserve.engine.protocol import ModelInfo
from lmserve.errors import EngineDeadError, ModelNotFoundError, UnsupportedModelError
from lmserve.metrics import ServerMetrics
from lmserve.server.loading import resolve_in_child
from lmserve.workers.engine_client import EngineClient
from lmserve.workers.messages import EngineSpec
from lmserve.workers.router import Router

if TYPE_CHECKING:
    from lmserve.engine.tokenizer import Tokenizer

logger = logging.getLogger("lmserve.server")
DEFAULT_ENGINE_FACTORY = "lmserve.engine.llm_engine:LLMEngine"


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class LoadPlan:
    """What to load. ``config`` is the configuration known at start; with ``resolve`` the model is
    fetched and the configuration rebuilt with its ``serving.properties`` (``cli`` and
    ``properties`` as given on the command line); without, ``config`` is final and
    ``config.engine.model`` a local directory. ``default_model`` pulls the default model first."""

    config: ServingConfig
    model_arg: str | None = None
    cli: Mapping[str, object] = field(default_factory=dict)
    properties: Path | None = None
    resolve: bool = True
    default_model: bool = False
    engine_factory: str = DEFAULT_ENGINE_FACTORY
    engine_options: Mapping[str, Any] = field(default_factory=dict)


class ModelRuntime:
    """One served model: its configuration, tokenizer, replicas behind a router, and metrics."""

    def __init__(self, plan: LoadPlan, metrics: ServerMetrics | None = None) -> None:
        self.plan = plan
        self.config = plan.config
        self.metrics = metrics or ServerMetrics()
        self.state = State.LOADING
        self.error: BaseException | None = None
        self.tokenizer: Tokenizer | None = None
        self.router: Router | None = None
        self.model_info: ModelInfo | None = None
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return self.config.model.name

    # ---- loading ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """Load everything within ``model_loading_timeout``; never raises (a failure is recorded in
        ``state`` and ``error``, and any engine process started is stopped)."""
        timeout = self.config.workers.model_loading_timeout_s
        try:
            async with asyncio.timeout(timeout):
                path = await self._resolve()
                with _phase("tokenizer"):
                    self.tokenizer = await asyncio.to_thread(_load_tokenizer, path, self.config)
                with _phase("engine load"):
                    await self._start_engine(path)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                exc = EngineDeadError(f"the model did not load within model_loading_timeout ({timeout:g}s)")
            self.state, self.error = State.FAILED, exc
            logger.error("model %s failed to load: %s", self.name, exc)
            await self._stop_replicas()
            return
        if self.state is State.LOADING:
            self.state = State.READY
            logger.info("model %s is ready (max_model_len %d)", self.name, self.model_info.max_model_len)  # type: ignore[union-attr]

    async def _resolve(self) -> Path:
        """Fetch the model and rebuild the configuration with its ``serving.properties``."""
        plan = self.plan
        if not plan.resolve:
            return Path(self.config.engine.model)
        from lmserve.config import load_serving_config

        with _phase("resolve"):
            fetched = await resolve_in_child(self.config.model.model_id, self.config.model.revision,
                                             plan.default_model)  # fmt: skip
        if fetched.has_custom_handler:
            raise UnsupportedModelError(f"{fetched.path} comes with a custom model.py handler; this server "
                                        "serves only the built-in text-generation handler")  # fmt: skip
        with _phase("config"):
            model_arg = fetched.model_id if plan.default_model else plan.model_arg
            self.config = load_serving_config(model_arg, cli=plan.cli,
                                              properties=plan.properties or fetched.properties)  # fmt: skip
            for warning in self.config.warnings:
                logger.warning("config: %s", warning)
        return fetched.path

    async def _start_engine(self, path: Path) -> None:
        engine_config = dataclasses.replace(self.config.engine, model=str(path),
                                            served_name=self.config.engine.served_name or self.name)  # fmt: skip
        spec = EngineSpec(self.plan.engine_factory, engine_config, dict(self.plan.engine_options))
        replica = EngineClient(spec, name="replica-0")
        replica.on_failure.append(self._on_replica_failure)
        self.router = Router([replica], max_outstanding=self.config.workers.job_queue_size)
        await replica.start()
        self.model_info = await replica.wait_ready()

    async def _stop_replicas(self) -> None:
        if self.router is not None:
            await asyncio.gather(*(replica.shutdown() for replica in self.router.replicas))

    def _on_replica_failure(self, replica: EngineClient) -> None:
        if self.router is not None and not self.router.ready_replicas() and self.state is State.READY:
            self.state, self.error = State.FAILED, replica.error
            logger.error("model %s has no running engine left: %s", self.name, replica.error)

    # ---- serving ---------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        """Raise ``ModelNotFoundError`` unless ``name`` is None or the served model's name."""
        if name is not None and name != self.name:
            raise ModelNotFoundError(f"model '{name}' is not served here; this server serves '{self.name}'")

    def ready_router(self) -> Router:
        """The router, if requests are being accepted; else ``EngineDeadError`` (503) saying why."""
        if self.state is State.READY and self.router is not None:
            return self.router
        reasons = {State.LOADING: "the model is still loading",
                   State.DRAINING: "the server is shutting down",
                   State.STOPPED: "the server is shutting down",
                   State.FAILED: f"the model failed: {self.error}"}  # fmt: skip
        raise EngineDeadError(reasons.get(self.state, "not ready"))

    def ping_status(self) -> int:
        """``/ping``: 200 ready, 500 failed, 503 loading or shutting down."""
        return {State.READY: 200, State.FAILED: 500}.get(self.state, 503)

    async def refresh_metrics(self) -> None:
        """Pull the engines' counters into the metrics (best effort: a busy engine may not answer)."""
        if self.router is None or not self.router.ready_replicas():
            return
        with contextlib.suppress(TimeoutError, EngineDeadError):
            self.metrics.update_engine(await self.router.stats())

    # ---- shutdown --------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop accepting requests, give those in flight ``timeout`` seconds, then abort the rest."""
        if self.state in (State.DRAINING, State.STOPPED):
            return
        was_ready, self.state = self.state is State.READY, State.DRAINING
        if not was_ready or self.router is None:
            return
        logger.info("draining: %d request(s) in flight, waiting up to %gs", self.router.outstanding, timeout)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.router.outstanding and loop.time() < end:
            await asyncio.sleep(0.05)
        if self.router.outstanding:
            logger.warning("draining: aborting %d request(s) still running", self.router.outstanding)
            self.router.abort_all(EngineDeadError("the server shut down before the request finished"))

    async def shutdown(self) -> None:
        """Stop the engine processes."""
        self.state = State.STOPPED
        await self._stop_replicas()


def _load_tokenizer(path: Path, config: ServingConfig) -> Tokenizer:
    from lmserve.engine.tokenizer import Tokenizer

    return Tokenizer(path, trust_remote_code=config.engine.trust_remote_code)


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    logger.info("%s: done in %.2fs", name, time.perf_counter() - started)
