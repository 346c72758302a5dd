"""The management API, on the inference port (as DJL Serving's): register, describe, scale, unregister.

| route | answer |
|---|---|
| ``POST /models?url=&model_name=&synchronous=`` | 200 and the description once loaded (``synchronous=true``, the default, as DJL); 202 with ``Location: /models/{name}`` at once with ``synchronous=false``; 409 for a name in use |
| ``GET /models`` | ``{"models": [{"model_name", "model_url", "status"}]}`` |
| ``GET /models/{name}`` | the description: status, worker bounds, replicas (pid, devices, state, outstanding and routed requests, restarts), queue depth, batch settings, ``max_model_len`` |
| ``PUT /models/{name}?min_worker=&max_worker=&synchronous=`` | 200 and the description once scaled; 202 with ``synchronous=false`` |
| ``DELETE /models/{name}`` | 200 once its requests finished (``graceful_shutdown_s``, then aborted) and its engines stopped |

Registration also takes ``min_worker``, ``max_worker``, ``job_queue_size``, ``batch_size`` and
``max_batch_delay``; everything else comes from the model's ``serving.properties`` and the
environment. When the server has an API key every route here needs ``Authorization: Bearer <key>``;
without one, POST, PUT and DELETE are off (403) unless the operator passed ``--enable-model-api``, and
a failed registration is told only its url and the reason in words (``lmserve.server.policy``).
Descriptions show cache paths relative to ``<cache>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from lmserve.config.settings import ServerConfig
from lmserve.engine.protocol import EngineStats
from lmserve.errors import EngineDeadError, InvalidRequestError
from lmserve.server.policy import error_text, for_caller, public_location
from lmserve.server.routes import registry_of
from lmserve.server.runtime import ModelRuntime, State
from lmserve.workers.replica import Replica
from lmserve.workers.replica_state import ReplicaState

router = APIRouter(tags=["Management"])
logger = logging.getLogger("lmserve.server")
Workers = Annotated[int | None, Query(ge=1)]
_STATS_TIMEOUT_S = 1.0  # a replica busy with a long step is described without its engine counters
_background: set[asyncio.Task[Any]] = set()


@router.post("/models")
async def register(request: Request, url: str, model_name: str | None = None, synchronous: bool = True,
                   min_worker: Workers = None, max_worker: Workers = None,
                   job_queue_size: Workers = None, batch_size: Workers = None,
                   max_batch_delay: Annotated[float | None, Query(ge=0)] = None) -> JSONResponse:  # fmt: skip
    """Register the model at ``url`` (directory, archive, ``s3://`` prefix, Hub id, GGUF file)."""
    from lmserve.config import default_model_name

    name = model_name or default_model_name(url)
    given = {"minWorkers": min_worker, "maxWorkers": max_worker, "job_queue_size": job_queue_size,
             "batch_size": batch_size, "max_batch_delay": max_batch_delay}  # fmt: skip
    overrides = {key: str(value) for key, value in given.items() if value is not None}
    registry = registry_of(request)
    try:
        runtime = await registry.register(url, name, overrides, synchronous)
    except Exception as exc:
        raise for_caller(exc, url, registry.server) from None
    if synchronous:
        return JSONResponse({"status": f'Model "{name}" registered', "model": await describe(runtime, registry.server)})
    body = {"status": f'Model "{name}" registration started', "model_name": name, "location": f"/models/{name}"}
    return JSONResponse(body, status_code=202, headers={"Location": f"/models/{name}"})


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Every registered model, with its status."""
    return {"models": [{"model_name": rt.name, "model_url": public_location(rt.config.model.model_id),
                        "status": rt.health()[1]} for rt in registry_of(request).models]}  # fmt: skip


@router.get("/models/{model_name}")
async def describe_model(model_name: str, request: Request) -> dict[str, Any]:
    """One model: status, replicas and settings."""
    registry = registry_of(request)
    return await describe(registry.get(model_name), registry.server)


@router.put("/models/{model_name}")
async def scale(model_name: str, request: Request, min_worker: Workers = None, max_worker: Workers = None,
                synchronous: bool = True) -> JSONResponse:  # fmt: skip
    """Set the worker bounds; replicas are started or drained and stopped to match."""
    registry = registry_of(request)
    runtime = registry.get(model_name)
    count = runtime.plan_scale(*_bounds(runtime, min_worker, max_worker))
    work = runtime.scale(count, registry.server.graceful_shutdown_s)
    if synchronous:
        try:
            await work
        except Exception as exc:
            raise for_caller(exc, _url(runtime), registry.server) from None
        return JSONResponse({"status": f'Model "{model_name}" scaled', "model": await describe(runtime, registry.server)})
    _in_background(work, f"scaling {model_name}")
    body = {"status": f'Model "{model_name}" scaling started', "location": f"/models/{model_name}"}
    return JSONResponse(body, status_code=202, headers={"Location": f"/models/{model_name}"})


@router.delete("/models/{model_name}")
async def unregister(model_name: str, request: Request) -> dict[str, str]:
    """Stop serving the model: new requests are 404 at once, those in flight get the grace period."""
    await registry_of(request).unregister(model_name)
    return {"status": f'Model "{model_name}" unregistered'}


def _bounds(runtime: ModelRuntime, low: int | None, high: int | None) -> tuple[int | None, int | None]:
    """The new (min, max) workers: a bound not given moves only as far as the given one needs."""
    if low is None and high is None:
        raise InvalidRequestError("min_worker", "give min_worker and/or max_worker")
    if low is not None and high is not None and low > high:
        raise InvalidRequestError("min_worker", f"must not exceed max_worker ({low} > {high})")
    if low is not None and high is None:
        high = runtime.max_workers if runtime.max_workers is None else max(runtime.max_workers, low)
    elif high is not None and low is None:
        low = runtime.min_workers if runtime.min_workers is None else min(runtime.min_workers, high)
    return low, high


async def describe(rt: ModelRuntime, server: ServerConfig) -> dict[str, Any]:
    """A model as the management API shows it (engine counters best effort, per replica); its
    error as ``lmserve.server.policy.for_caller`` allows."""
    replicas = rt.launcher.replicas if rt.launcher is not None else []
    stats = await asyncio.gather(*(_stats(replica) for replica in replicas))
    info, cfg = rt.model_info, rt.config
    out: dict[str, Any] = {
        "model_name": rt.name, "model_url": public_location(cfg.model.model_id), "status": rt.health()[1],
        "loaded_at_startup": rt.loaded_at_startup, "tensor_parallel_degree": cfg.engine.tensor_parallel_degree,
        "min_workers": rt.min_workers, "max_workers": rt.max_workers,
        "devices": _devices(rt), "job_queue_size": cfg.workers.job_queue_size,
        "queue_depth": rt.outstanding,  # on the replicas, and waiting in a handler's batcher
        "batch_size": cfg.batching.batch_size, "max_batch_delay_ms": cfg.batching.max_batch_delay_ms,
        "max_rolling_batch_size": info.max_num_seqs if info else cfg.engine.max_num_seqs,
        "max_num_batched_tokens": info.max_num_batched_tokens if info else None,
        "max_model_len": info.max_model_len if info else None,
        "dtype": info.dtype if info else None, "device": info.device if info else None,
        "replicas": [replica.describe(s) for replica, s in zip(replicas, stats, strict=True)],
    }  # fmt: skip
    if rt.state is State.FAILED and rt.error is not None:
        out["error"] = error_text(rt.error, _url(rt), server)
    return out


def _url(rt: ModelRuntime) -> str:
    """The location as it was given (registration url or command line), for messages."""
    return public_location(rt.plan.model_arg or rt.config.model.model_id)


def _devices(rt: ModelRuntime) -> dict[str, Any] | None:
    if rt.launcher is None:
        return None
    devices = rt.launcher.devices
    return {"kind": devices.kind, "count": devices.count, "cores": len(devices.cores)}


async def _stats(replica: Replica) -> EngineStats | None:
    if replica.client is None or replica.state is not ReplicaState.READY:
        return None
    with contextlib.suppress(TimeoutError, EngineDeadError):
        return await replica.stats(_STATS_TIMEOUT_S)
    return None


def _in_background(work: Any, what: str) -> None:
    async def run() -> None:
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - nobody awaits it: log why
            logger.error("%s failed: %s", what, exc)

    task = asyncio.create_task(run())
    _background.add(task)
    task.add_done_callback(_background.discard)
