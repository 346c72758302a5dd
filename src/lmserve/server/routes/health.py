"""Health, metrics and model listing: ``GET /ping``, ``GET /health``, ``GET /metrics``, ``GET /v1/models``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lmserve.server.routes import registry_of

router = APIRouter(tags=["Health and metrics"])


@router.get("/ping")
async def ping(request: Request) -> JSONResponse:
    """SageMaker health check: 200 while every model has a ready replica, 503 while one is loading,
    restarting all its replicas or shutting down, 500 once one has failed. The body gives each
    model's state and ready replicas."""
    status, body = registry_of(request).health()
    return JSONResponse(body, status_code=status)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """TGI health check: 200 when requests are accepted, else 503."""
    status, body = registry_of(request).health()
    return JSONResponse({"status": body["status"]}, status_code=200 if status == 200 else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics; engine gauges are refreshed on each scrape."""
    registry = registry_of(request)
    await registry.refresh_metrics()
    body, content_type = registry.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """OpenAI model list: every registered model."""
    cards = []
    for rt in registry_of(request).models:
        card: dict[str, Any] = {"id": rt.name, "object": "model", "created": rt.created, "owned_by": "lmserve"}
        if rt.model_info is not None:
            card["max_model_len"] = rt.model_info.max_model_len
        cards.append(card)
    return {"object": "list", "data": cards}
