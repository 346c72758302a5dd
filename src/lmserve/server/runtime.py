"""``ModelRuntime``: one served model's lifecycle, from loading through draining to shutdown.

The HTTP port opens before loading starts, so health checks see 503 until the model is ready.
Loading runs four timed phases, one log line each: resolve (fetch the model), config (rebuild the
configuration with the model's ``serving.properties``), tokenizer (both within
``model_loading_timeout``), engine (count the devices, start the replicas through a ``Launcher``,
each within ``model_loading_timeout``). A failure leaves the runtime ``FAILED``: ``/ping`` answers
500 and inference routes 503, with the reason. Once loaded, the launcher restarts replicas that die;
the model is ``FAILED`` only when one of them fails ``retry_threshold`` restarts in a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmserve.config.keys import for_generation_only
from lmserve.config.settings import ServingConfig
from lmserve.config.values import OUTPUT_FORMATS
from lmserve.engine.protocol import ModelInfo
from lmserve.errors import (
    EngineDeadError,
    EngineFailedError,
    InvalidRequestError,
    NotAllowedError,
    ShuttingDownError,
)
from lmserve.gc_freeze import freeze_startup_objects
from lmserve.handlers.launcher import HandlerLauncher
from lmserve.handlers.output_formatter import Formatter, load_output_formatter
from lmserve.handlers.select import HandlerChoice, choose_handler
from lmserve.handlers.setup import PreparedHandler, handler_launcher, prepare_handler
from lmserve.metrics import ServerMetrics
from lmserve.server.loading import resolve_in_child
from lmserve.store.policy import FetchPolicy
from lmserve.workers.launcher import Backoff, Launcher
from lmserve.workers.messages import EngineSpec
from lmserve.workers.placement import Devices, detect_devices, replica_count, resolve_degree
from lmserve.workers.router import Router, drain

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
    ``config.engine.model`` a local directory. ``default_model`` pulls the default model first.

    A model registered through the management API has a ``fetch_policy`` (its allowed locations)
    and ``remote_code_consent`` (whether the operator lets it run code from its files); both None
    for the startup model, which is the operator's own choice."""

    config: ServingConfig
    model_arg: str | None = None
    cli: Mapping[str, object] = field(default_factory=dict)
    properties: Path | None = None
    resolve: bool = True
    default_model: bool = False
    engine_factory: str = DEFAULT_ENGINE_FACTORY
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    restart_backoff: Backoff = field(default_factory=Backoff)
    fetch_policy: FetchPolicy | None = None
    remote_code_consent: bool | None = None


class ModelRuntime:
    """One served model: its configuration, tokenizer, replicas (launcher and router) and metrics."""

    def __init__(self, plan: LoadPlan, metrics: ServerMetrics | None = None, loaded_at_startup: bool = True) -> None:
        self.plan = plan
        self.config = plan.config
        self.metrics = metrics or ServerMetrics()
        self.loaded_at_startup = loaded_at_startup
        self.state = State.LOADING
        self.error: BaseException | None = None
        self.tokenizer: Tokenizer | None = None
        self.output_formatter: Formatter | None = None  # a model.py function (option.output_formatter)
        self.launcher: Launcher | None = None
        self.handler: HandlerLauncher | None = None  # set when a handler serves it, not the engine
        self.handler_task: str | None = None  # "custom", "text-embedding", "text-classification"
        self.model_info: ModelInfo | None = None
        self.created = int(time.time())
        self.min_workers, self.max_workers = plan.config.workers.min_workers, plan.config.workers.max_workers
        self.ready_once = False  # it has served: from now on it counts for /ping (see ModelRegistry)
        self._stopping: asyncio.Task[None] | None = None
        self._created: tuple[Path, ...] = ()  # cache directories this load's fetch made

    @property
    def name(self) -> str:
        return self.config.model.name

    @property
    def router(self) -> Router | None:
        return self.launcher.router if self.launcher is not None else None

    # ---- loading ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """Load the model; never raises (a failure is recorded in ``state`` and ``error``, and any
        engine process started is stopped)."""
        timeout = self.config.workers.model_loading_timeout_s
        try:
            async with asyncio.timeout(timeout):
                path = await self._resolve()
                choice = self._choose_handler(path)
                if choice is None:
                    with _phase("tokenizer"):
                        self.tokenizer = await asyncio.to_thread(_load_tokenizer, path, self.config)
                        self.output_formatter = await asyncio.to_thread(self._load_output_formatter)
                else:
                    with _phase("handler setup"):
                        prepared = await asyncio.to_thread(prepare_handler, choice, path, self._handler_dir,
                                                           self.config)  # fmt: skip
            if choice is None:
                for warning in filter(for_generation_only, self.config.warnings):
                    logger.warning("config: %s", warning)  # a handler model uses these keys
                with _phase("engine load"):
                    await self._start_engine(path)
            else:
                with _phase("handler load"):
                    await self._start_handler(path, choice.task, prepared)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                exc = EngineDeadError(f"the model did not load within model_loading_timeout ({timeout:g}s)")
            self.state, self.error = State.FAILED, exc
            logger.error("model %s failed to load: %s", self.name, exc)
            await self._stop_replicas()
            await asyncio.to_thread(_remove, self._created)
            return
        if self.state is State.LOADING:
            # Not a full collection: the event loop may be serving other models meanwhile.
            freeze_startup_objects(collect=False)
            self.state, self.ready_once = State.READY, True
            assert self.launcher is not None, "a loaded model has its launcher"
            if self.handler is not None:
                limits = f"{self.handler_task} handler"
            else:
                assert self.model_info is not None, "a loaded engine model has its model info"
                limits = f"max_model_len {self.model_info.max_model_len}"
            logger.info("model %s is ready: %d replica(s), %s", self.name, len(self.launcher.replicas), limits)

    async def _resolve(self) -> Path:
        """Fetch the model and rebuild the configuration with its ``serving.properties``."""
        plan = self.plan
        if not plan.resolve:
            self._handler_dir = Path(self.config.engine.model)
            return self._handler_dir
        from lmserve.config import load_serving_config

        policy = plan.fetch_policy or FetchPolicy(max_extracted_bytes=self.config.server.max_extracted_bytes)
        with _phase("resolve"):
            fetched = await resolve_in_child(self.config.model.model_id, self.config.model.revision,
                                             plan.default_model, policy)  # fmt: skip
        self._created = fetched.created
        self._handler_dir = fetched.properties.parent if fetched.properties is not None else fetched.path
        if fetched.properties is None and plan.model_arg and (Path(plan.model_arg) / "serving.properties").is_file():
            # A local directory whose serving.properties sends option.model_id elsewhere: the
            # configuration came from it, and so do model.py and requirements.txt beside it.
            self._handler_dir = Path(plan.model_arg)
        with _phase("config"):
            model_arg = fetched.model_id if plan.default_model else plan.model_arg
            self.config = load_serving_config(model_arg, cli=plan.cli,
                                              properties=plan.properties or fetched.properties)  # fmt: skip
            if plan.remote_code_consent is not None:
                from lmserve.server.policy import check_registered

                self.config = check_registered(self.config, str(plan.model_arg), plan.remote_code_consent)
            self.min_workers, self.max_workers = self.config.workers.min_workers, self.config.workers.max_workers
            for warning in self.config.warnings:
                if not for_generation_only(warning):
                    logger.warning("config: %s", warning)
        return fetched.path

    async def _start_engine(self, path: Path) -> None:
        devices = await asyncio.to_thread(detect_devices, self.config.engine.device, self.config.workers.cpu_devices)
        self._settle_on(devices)
        engine_config = dataclasses.replace(self.config.engine, model=str(path),
                                            served_name=self.config.engine.served_name or self.name)  # fmt: skip
        spec = EngineSpec(self.plan.engine_factory, engine_config, dict(self.plan.engine_options))
        count = self.target_replicas(devices)
        logger.info("model %s: %d replica(s) at tensor_parallel_degree %d on %d %s device(s)", self.name, count,
                    engine_config.tensor_parallel_degree, devices.count, devices.kind)  # fmt: skip
        self.launcher = Launcher(self.name, spec, devices, self.config.workers, self.plan.restart_backoff,
                                 on_failed=self._on_failed)  # fmt: skip
        self.model_info = await self.launcher.start(count)

    def _choose_handler(self, path: Path) -> HandlerChoice | None:
        """The handler serving this model (None: the engine). Code that came with a model registered
        at run time is refused: only the operator, who named the startup model, chose to run it."""
        choice = choose_handler(path, self._handler_dir, self.config)
        if choice is not None and choice.custom and not self.loaded_at_startup:
            raise NotAllowedError(
                f"model '{self.name}' brings its own handler code ({choice.entry}, option.entryPoint or "
                "model.py); a model registered at run time may only use the built-in handlers. Serve it "
                "by naming it when the server starts instead")  # fmt: skip
        return choice

    def _load_output_formatter(self) -> Formatter | None:
        """The model.py function ``option.output_formatter`` names, if it names one; refused for a
        model registered at run time, like any code that comes with a model."""
        name = self.config.model.output_formatter
        if name is None or name in OUTPUT_FORMATS:
            return None
        if not self.loaded_at_startup:
            raise NotAllowedError(
                f"model '{self.name}' names a custom output formatter (option.output_formatter={name!r}), which runs "
                "code from its model.py; a model registered at run time may only use json, jsonlines or sse. Serve "
                "it by naming it when the server starts instead")  # fmt: skip
        return load_output_formatter(self._handler_dir, name)

    async def _start_handler(self, path: Path, task: str, prepared: PreparedHandler) -> None:
        devices = await asyncio.to_thread(detect_devices, self.config.engine.device, self.config.workers.cpu_devices)
        count = replica_count(devices, 1, self.min_workers, self.max_workers)
        logger.info("model %s: %d handler worker(s) (%s), batch_size %d, max_batch_delay %gms", self.name, count,
                    prepared.spec.entry, self.config.batching.batch_size,
                    self.config.batching.max_batch_delay_ms)  # fmt: skip
        self.handler = handler_launcher(self.name, prepared, self.config, devices, self.plan.restart_backoff,
                                        self._on_failed, self.metrics.observe_batch)  # fmt: skip
        self.launcher, self.handler_task = self.handler, task
        self.model_info = await self.handler.start(count)

    def _settle_on(self, devices: Devices) -> None:
        """What depends on the devices found: tensor_parallel_degree=max, and the device's own worker
        bounds (gpu.minWorkers, cpu.maxWorkers, ...) over minWorkers/maxWorkers."""
        degree = resolve_degree(devices, self.config.engine.tensor_parallel_degree)
        if degree != self.config.engine.tensor_parallel_degree:
            why = "every visible GPU" if devices.kind == "cuda" else "one rank on all the cores is fastest on the CPU"
            logger.info("model %s: tensor_parallel_degree=max is %d (%s)", self.name, degree, why)
            engine = dataclasses.replace(self.config.engine, tensor_parallel_degree=degree)
            self.config = dataclasses.replace(self.config, engine=engine)
        self.min_workers, self.max_workers = self.config.workers.bounds(devices.kind)

    def target_replicas(self, devices: Devices | None = None) -> int:
        """``devices // tensor_parallel_degree``, capped by ``max_workers``, at least ``min_workers``."""
        devices = devices or (self.launcher.devices if self.launcher is not None else None)
        assert devices is not None, "the devices are known once the engine phase began"
        return replica_count(devices, self.config.engine.tensor_parallel_degree, self.min_workers, self.max_workers)

    def _on_failed(self, error: BaseException) -> None:
        """A replica failed ``retry_threshold`` restarts in a row: the model is failed; stop it all."""
        if self.state is not State.READY:
            return
        self.state, self.error = State.FAILED, error
        logger.error("model %s failed: %s", self.name, error)
        self.abort_all(EngineFailedError(f"the model failed: {error}"))
        self._stopping = asyncio.create_task(self._stop_replicas(), name=f"stop-{self.name}")

    async def _stop_replicas(self) -> None:
        if self.launcher is not None:
            await self.launcher.stop()

    # ---- serving ---------------------------------------------------------------------------------

    def ready_router(self) -> Router:
        """The router, if requests are being accepted; else ``EngineDeadError`` (503) saying why.
        With no replica ready at the moment (all restarting) the router itself says so."""
        if self.state is State.READY and self.handler is not None:
            raise InvalidRequestError("model", f"model '{self.name}' is served by a {self.handler_task} handler, "
                                      "not the text-generation engine; send its requests to /invocations "
                                      "(or /predictions/{model}, /v1/embeddings for embeddings)")  # fmt: skip
        if self.state is State.READY and self.router is not None:
            return self.router
        if self.state in (State.DRAINING, State.STOPPED):
            raise ShuttingDownError("the server is shutting down")
        reasons = {State.LOADING: "the model is still loading", State.FAILED: f"the model failed: {self.error}"}
        raise EngineDeadError(reasons.get(self.state, "not ready"))

    def ready_handler(self) -> HandlerLauncher | None:
        """The handler launcher when a handler serves this model; None when the engine does.
        ``EngineDeadError`` (503) saying why while the model cannot serve (loading, failed, ...)."""
        if self.state is not State.READY:
            self.ready_router()  # raises with the reason
        return self.handler

    def health(self) -> tuple[int, str]:
        """(``/ping`` status, state word): 200 ``ready`` while at least one replica is ready, 503
        ``recovering`` while none is (they are restarting), 503 ``loading``/``draining``/``stopped``,
        500 ``failed``."""
        if self.state is State.READY:
            return (200, "ready") if self.router is not None and self.router.ready_replicas() else (503, "recovering")
        return {State.FAILED: 500}.get(self.state, 503), self.state.value

    def plan_scale(self, min_workers: int | None, max_workers: int | None) -> int:
        """Take new worker bounds and return the replica count they give; refuses (and keeps the old
        bounds) while the model is not ready or when the devices cannot hold that many replicas."""
        if self.state is not State.READY or self.launcher is None:
            raise EngineDeadError(f"model {self.name} cannot be scaled while it is {self.state.value}")
        count = replica_count(self.launcher.devices, self.config.engine.tensor_parallel_degree, min_workers,
                              max_workers)  # fmt: skip
        self.launcher.check_count(count)
        self.min_workers, self.max_workers = min_workers, max_workers
        return count

    async def scale(self, count: int, drain_timeout: float) -> None:
        """Start or drain and stop replicas until ``count`` run (see ``Launcher.scale``)."""
        assert self.launcher is not None, "plan_scale() first"
        await self.launcher.scale(count, drain_timeout)

    # ---- shutdown --------------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Requests accepted and not finished: on the replicas, and waiting in a handler's batcher."""
        waiting = self.handler.batcher.waiting if self.handler is not None else 0
        return (self.router.outstanding if self.router is not None else 0) + waiting

    def abort_all(self, error: BaseException) -> None:
        """End every accepted request with ``error``: on the replicas, and waiting in a handler's batcher."""
        if self.handler is not None:
            self.handler.batcher.fail_all(error)
        if self.router is not None:
            self.router.abort_all(error)

    async def drain(self, timeout: float) -> None:
        """Stop accepting requests, give those in flight ``timeout`` seconds, then abort the rest."""
        if self.state in (State.DRAINING, State.STOPPED):
            return
        was_ready, self.state = self.state is State.READY, State.DRAINING
        if not was_ready or self.router is None:
            return
        logger.info("draining %s: %d request(s) in flight, waiting up to %gs", self.name, self.outstanding,
                    timeout)  # fmt: skip
        aborted = await drain(self, timeout, ShuttingDownError("the server shut down before the request finished"))
        if aborted:
            logger.warning("draining %s: aborted %d request(s) still running", self.name, aborted)

    async def shutdown(self) -> None:
        """Stop the engine processes."""
        self.state = State.STOPPED
        await self._stop_replicas()


def _load_tokenizer(path: Path, config: ServingConfig) -> Tokenizer:
    from lmserve.engine.tokenizer import Tokenizer

    return Tokenizer(path, trust_remote_code=config.engine.trust_remote_code)


def _remove(directories: tuple[Path, ...]) -> None:
    """Delete what a failed load fetched into the cache (an extracted archive), so it does not stay."""
    for directory in directories:
        logger.info("removing %s: the load that fetched it failed", directory)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    logger.info("%s: done in %.2fs", name, time.perf_counter() - started)
