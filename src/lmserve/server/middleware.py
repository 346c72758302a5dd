"""ASGI middleware: the bearer-token check (and the model API switch), the request-body size limit,
and HTTP responses counted by route and status."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.config.settings import ServerConfig
from lmserve.metrics import ServerMetrics
from lmserve.server.errors import UnauthorizedError, error_response
from lmserve.server.policy import model_api_refusal

_OPEN_PATHS = frozenset({"/ping", "/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class TokenAuthMiddleware:
    """With an API key configured, refuse with 401 (before the body is read or anything changes)
    a request without ``Authorization: Bearer <key>`` to the management API (``/models...``), and
    to the inference routes too when ``protect_inference`` is set. Health checks, metrics and the
    API docs stay open, so load balancers and scrapers need no key. Without a key, POST, PUT and
    DELETE on ``/models`` are refused with 403 unless ``enable_model_api`` is set."""

    def __init__(self, app: ASGIApp, server: Callable[[], ServerConfig]) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        config = self.server()
        refusal = model_api_refusal(config, scope.get("method", ""), scope["path"]) if scope["type"] == "http" else None
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        if scope["type"] == "http" and config.api_key and _protected(scope["path"], config):
            problem = _check_token(dict(scope["headers"]).get(b"authorization"), config.api_key)
            if problem is not None:
                await error_response(UnauthorizedError(problem))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _protected(path: str, config: ServerConfig) -> bool:
    if path == "/models" or path.startswith("/models/"):
        return True
    return config.protect_inference and path not in _OPEN_PATHS


def _check_token(header: bytes | None, key: str) -> str | None:
    """None when ``header`` carries the key; else what is wrong, without revealing the key.

    Compared as bytes: the header's raw bytes against the key in UTF-8, which is how clients send a
    non-ASCII key (decoding the header one way and encoding it another never matched)."""
    if header is None:
        return "this route needs the server's API key: send 'Authorization: Bearer <key>'"
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode("utf-8")):
        return "the API key in the Authorization header is not this server's"
    return None


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes()`` with 413: at once when ``Content-Length`` says so, else as
    soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            problem = _check_length(declared, limit)
            if problem is not None:
                await error_response(problem)(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"the request body is larger than max_request_bytes ({limit})")
            return message

        await self.app(scope, limited_receive, send)


def _check_length(declared: bytes, limit: int) -> HTTPException | None:
    try:
        length = int(declared)
    except ValueError:
        return HTTPException(400, "the Content-Length header is not a number")
    if length > limit:
        return HTTPException(413, f"the request body ({length} bytes) is larger than max_request_bytes ({limit})")
    return None


class MetricsMiddleware:
    """Count every HTTP response by route template (``unmatched`` for unknown paths) and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def remember_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, remember_status)
        finally:
            route: Any = scope.get("route")
            self.metrics.count_response(getattr(route, "path", "unmatched"), status)
