"""Health, metrics and model listing: ``GET /ping``, ``GET /health``, ``GET /metrics``, ``GET /v1/models``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lmserve.server.routes import runtime_of
from lmserve.server.runtime import State

router = APIRouter(tags=["Health and metrics"])


@router.get("/ping")
async def ping(request: Request) -> JSONResponse:
    """SageMaker health check: 200 ready, 503 loading or shutting down, 500 failed."""
    rt = runtime_of(request)
    body: dict[str, Any] = {"status": rt.state.value, "model": rt.name}
    if rt.state is State.FAILED and rt.error is not None:
        body["error"] = str(rt.error)
    return JSONResponse(body, status_code=rt.ping_status())


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """TGI health check: 200 when requests are accepted, else 503."""
    rt = runtime_of(request)
    return JSONResponse({"status": rt.state.value}, status_code=200 if rt.state is State.READY else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics; engine gauges are refreshed on each scrape."""
    rt = runtime_of(request)
    await rt.refresh_metrics()
    body, content_type = rt.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """OpenAI model list: the one served model."""
    rt = runtime_of(request)
    card: dict[str, Any] = {"id": rt.name, "object": "model", "created": rt.created, "owned_by": "lmserve"}
    if rt.model_info is not None:
        card["max_model_len"] = rt.model_info.max_model_len
    return {"object": "list", "data": [card]}
