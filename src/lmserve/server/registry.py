"""``ModelRegistry``: the models this server serves, by name, and the server's health over them.

The model given on the command line is loaded at startup; the management API registers and
unregisters more (``register``/``unregister``). A model *counts* once it can serve: it was loaded
at startup, or it was registered later and has loaded. A registration still loading, or one that
failed to load, stays listed (with its error) but never counts.

A request names its model (``model_name`` query parameter, the OpenAI ``model`` field, or
``/predictions/{model}``); without a name the only model that counts and has not failed serves, and
with several a name is required (400).

``/ping`` (``health``) answers for every model that counts: 500 when any of them failed, else 503
when any has no ready replica (loading, restarting, draining) or when none counts at all (every
model was unregistered), else 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from lmserve.config.settings import ServerConfig
from lmserve.engine.protocol import EngineStats
from lmserve.errors import EngineDeadError, InvalidRequestError, LMServeError, ModelNotFoundError
from lmserve.metrics import ServerMetrics
from lmserve.server.errors import ModelConflictError
from lmserve.server.policy import registration_guard
from lmserve.server.runtime import LoadPlan, ModelRuntime, State
from lmserve.workers.engine_client import ReplicaState

logger = logging.getLogger("lmserve.server")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class ModelRegistry:
    """See the module docstring. ``template`` is the startup plan: registered models use its engine
    factory, engine options and restart backoff."""

    def __init__(self, server: ServerConfig, template: LoadPlan | None = None,
                 metrics: ServerMetrics | None = None) -> None:  # fmt: skip
        self.server = server
        self.template = template
        self.metrics = metrics or ServerMetrics()
        self.models: list[ModelRuntime] = []
        self.draining = False
        self._loads: dict[ModelRuntime, asyncio.Task[None]] = {}
        self._claimed: set[str] = set()  # names whose registration is under way, before the runtime exists

    @classmethod
    def serving(cls, plan: LoadPlan) -> ModelRegistry:
        """A registry that loads ``plan``'s model at startup."""
        registry = cls(plan.config.server, plan)
        registry.models.append(ModelRuntime(plan, registry.metrics, loaded_at_startup=True))
        return registry

    # ---- finding models --------------------------------------------------------------------------

    def find(self, name: str) -> ModelRuntime | None:
        return next((rt for rt in self.models if rt.name == name), None)

    def get(self, name: str) -> ModelRuntime:
        """The model called ``name``; ``ModelNotFoundError`` (404) listing the loaded ones if none is."""
        runtime = self.find(name)
        if runtime is None:
            loaded = ", ".join(f"'{rt.name}'" for rt in self.models) or "none"
            raise ModelNotFoundError(f"model '{name}' is not served here; loaded models: {loaded}")
        return runtime

    def counted(self) -> list[ModelRuntime]:
        """The models that count for ``/ping`` and for unnamed requests (see the module docstring)."""
        return [rt for rt in self.models if rt.loaded_at_startup or rt.ready_once]

    def pick(self, name: str | None) -> ModelRuntime:
        """The model a request names, or when it names none the only model that counts and has not
        failed (a lone model that failed is still picked, so the caller hears its error)."""
        if name is not None:
            return self.get(name)
        serving = [rt for rt in self.counted() if rt.state is not State.FAILED] or self.counted()
        if len(serving) == 1:
            return serving[0]
        if not serving:
            raise ModelNotFoundError("no model is registered; register one with POST /models?url=...")
        names = ", ".join(f"'{rt.name}'" for rt in serving)
        raise InvalidRequestError("model_name", f"{len(serving)} models are loaded ({names}); name one, "
                                  "e.g. with ?model_name=...")  # fmt: skip

    # ---- lifecycle -------------------------------------------------------------------------------

    async def load_startup_models(self) -> None:
        """Load the models given at startup, together."""
        await asyncio.gather(*(rt.load() for rt in self.models if rt.loaded_at_startup))

    async def register(self, url: str, name: str, overrides: Mapping[str, object], synchronous: bool) -> ModelRuntime:
        """Register the model at ``url`` as ``name`` and start loading it; with ``synchronous`` wait
        until it is ready (a load failure then unregisters it and is raised)."""
        from lmserve.config import load_serving_config

        if self.draining:
            raise EngineDeadError("the server is shutting down")
        if not _MODEL_NAME.fullmatch(name):
            raise InvalidRequestError("model_name", f"{name!r} is not a usable model name: use 1 to 128 letters, "
                                      "digits, '_', '.' or '-', starting with a letter or digit")  # fmt: skip
        # The name is claimed before the first await, so concurrent registrations of one name get 409.
        if self.find(name) is not None or name in self._claimed:
            raise ModelConflictError(f"a model named '{name}' is already registered; unregister it first "
                                     "(DELETE /models/{name}) or choose another model_name")  # fmt: skip
        policy, consent = registration_guard(self.server, url)  # 403 before anything at url is read
        self._claimed.add(name)
        try:
            cli = {"served_name": name, **overrides}
            config = await asyncio.to_thread(load_serving_config, url, cli=cli)
            base = self.template or LoadPlan(config)
            plan = replace(base, config=config, model_arg=url, cli=cli, properties=None, resolve=True,
                           default_model=False, fetch_policy=policy, remote_code_consent=consent)  # fmt: skip
            runtime = ModelRuntime(plan, self.metrics, loaded_at_startup=False)
            self.models.append(runtime)
        finally:
            self._claimed.discard(name)
        load = self._loads[runtime] = asyncio.create_task(self._load(runtime), name=f"load-{name}")
        if synchronous:
            await asyncio.shield(load)
            if runtime.state is State.FAILED:
                await self._forget(runtime)
                error = runtime.error
                raise error if isinstance(error, LMServeError) else EngineDeadError(f"model '{name}' failed to load: "
                                                                                    f"{error}")  # fmt: skip
        return runtime

    async def _load(self, runtime: ModelRuntime) -> None:
        try:
            await runtime.load()
        finally:
            self._loads.pop(runtime, None)

    async def unregister(self, name: str) -> None:
        """Stop routing to ``name`` at once (404), let its requests in flight finish for up to
        ``graceful_shutdown_s``, abort the rest and stop its engines."""
        runtime = self.get(name)
        self.models.remove(runtime)
        await runtime.drain(self.server.graceful_shutdown_s)
        await self._forget(runtime)

    async def _forget(self, runtime: ModelRuntime) -> None:
        with contextlib.suppress(ValueError):
            self.models.remove(runtime)
        load = self._loads.pop(runtime, None)
        if load is not None:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
        await runtime.shutdown()

    async def drain(self, timeout: float) -> None:
        """Server shutdown, first part: every model stops accepting and finishes what it can."""
        self.draining = True
        await asyncio.gather(*(rt.drain(timeout) for rt in self.models))

    async def shutdown(self) -> None:
        """Stop every model's engines (loads still running are cancelled)."""
        for load in self._loads.values():
            load.cancel()
        await asyncio.gather(*self._loads.values(), return_exceptions=True)
        await asyncio.gather(*(rt.shutdown() for rt in self.models))

    # ---- health and metrics ----------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/ping``'s status code and body (see the module docstring)."""
        counted = self.counted()
        models: dict[str, Any] = {}
        worst: tuple[int, str, BaseException | None] = (200, "ready", None)
        if not counted:
            worst = (503, "no model", ModelNotFoundError("no model is registered"))
        for rt in counted:
            code, word = rt.health()
            replicas = rt.launcher.replicas if rt.launcher is not None else []
            models[rt.name] = {"status": word, "replicas_ready": sum(r.state is ReplicaState.READY for r in replicas),
                               "replicas": len(replicas)}  # fmt: skip
            if rt.error is not None and rt.state is State.FAILED:
                models[rt.name]["error"] = str(rt.error)
            if code > worst[0]:
                worst = (code, word, rt.error if rt.state is State.FAILED else None)
        if self.draining and worst[0] == 200:
            worst = (503, "draining", None)
        body: dict[str, Any] = {"status": worst[1], "models": models}
        if len(counted) == 1:
            body["model"] = counted[0].name
        if worst[2] is not None:
            body["error"] = str(worst[2])
        return worst[0], body

    async def refresh_metrics(self) -> None:
        """Pull every ready model's engine counters, summed, into the metrics (best effort)."""
        snapshots: list[EngineStats] = []
        for rt in self.models:
            if rt.router is None or not rt.router.ready_replicas():
                continue
            with contextlib.suppress(TimeoutError, EngineDeadError):
                snapshots.append(await rt.router.stats())
        if snapshots:
            total: dict[str, int] = {}
            for snapshot in snapshots:
                for key, value in vars(snapshot).items():
                    total[key] = total.get(key, 0) + value
            self.metrics.update_engine(EngineStats(**total))
