"""The one table from exception to HTTP status, and the JSON error body every route returns.

Body: ``{"error": message, "code": status}``, plus ``"field"`` when one input is to blame and
``"error_type"`` (TGI's validation / overloaded / generation, and ours for a 503 that is not
overload: engine_failure, shutting_down, unavailable), which TGI clients read. A status code is
decided here and nowhere else; streaming routes use the same body for their error event.

| exception | status |
|---|---|
| InvalidRequestError, request validation (pydantic, bad JSON), ConfigError, UnsupportedModelError | 400 |
| UnauthorizedError (a protected route without the right bearer token; ``WWW-Authenticate``) | 401 |
| NotAllowedError (the server's settings forbid it: model API off, a url outside ``allowed_urls``, a registered model asking to run its own code) | 403 |
| ModelNotFoundError | 404 |
| ModelConflictError (registering a name already in use) | 409 |
| RequestTooLargeError (body over ``max_request_bytes``) | 413 |
| HandlerError (custom handler raised) | 424 |
| CapacityError (queue full; ``Retry-After``) | 429, or 503 when ``queue_full_status=503`` |
| EngineFailedError (an engine crashed, exited or froze; ``engine_failure``) | 503 |
| ShuttingDownError (the server is shutting down; ``shutting_down``) | 503 |
| EngineDeadError (loading, restarting, failed to load; ``unavailable``) | 503 |
| RequestTimeoutError (ran past ``predict_timeout``) | 504 |
| OutOfMemoryError | 507 |
| GenerationError (the engine failed one request) | 500 |
| ClientDisconnectedError (nobody reads it; shows in metrics) | 499 |
| Starlette HTTPException (unknown route, wrong method) | its own |
| anything else: a bug, logged with its traceback | 500 |

504 for ``predict_timeout``: the server gave up waiting on its own engine, as a gateway gives up on
an upstream; 408 would blame the client for sending slowly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmserve.engine.outputs import RequestDelta
from lmserve.errors import (
    CapacityError,
    ConfigError,
    EngineDeadError,
    EngineFailedError,
    HandlerError,
    InvalidRequestError,
    LMServeError,
    ModelNotFoundError,
    NotAllowedError,
    OutOfMemoryError,
    RequestTimeoutError,
    ShuttingDownError,
    UnsupportedModelError,
)

logger = logging.getLogger("lmserve.server")


class RequestTooLargeError(LMServeError):
    """The request body is larger than ``max_request_bytes`` (HTTP 413)."""


class UnauthorizedError(LMServeError):
    """A protected route was called without the server's bearer token (HTTP 401)."""


class ModelConflictError(LMServeError):
    """A model of that name is already registered (HTTP 409)."""


class GenerationError(LMServeError):
    """The engine ended one request with ``finish_reason="error"`` (HTTP 500, not a server bug)."""


class ClientDisconnectedError(LMServeError):
    """The client closed the connection before the answer was ready (499, as nginx logs it; nobody
    reads the response, the code only shows in metrics and logs)."""


_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (InvalidRequestError, 400, "validation"),
    (RequestValidationError, 400, "validation"),
    (ConfigError, 400, "validation"),
    (UnsupportedModelError, 400, "validation"),
    (UnauthorizedError, 401, "validation"),
    (NotAllowedError, 403, "validation"),
    (ModelNotFoundError, 404, "validation"),
    (ModelConflictError, 409, "validation"),
    (RequestTooLargeError, 413, "validation"),
    (HandlerError, 424, "generation"),
    (CapacityError, 429, "overloaded"),
    (EngineFailedError, 503, "engine_failure"),
    (ShuttingDownError, 503, "shutting_down"),
    (EngineDeadError, 503, "unavailable"),
    (RequestTimeoutError, 504, "generation"),
    (OutOfMemoryError, 507, "generation"),
    (GenerationError, 500, "generation"),
    (ClientDisconnectedError, 499, "generation"),
)


@dataclasses.dataclass(frozen=True)
class ErrorReply:
    """What the client is told about one exception."""

    status: int
    message: str
    error_type: str
    field: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.status, "error_type": self.error_type}
        if self.field is not None:
            body["field"] = self.field
        return body


def describe(exc: BaseException, capacity_status: int = 429) -> ErrorReply:
    """Status, message and headers for ``exc``; unexpected exceptions are logged here."""
    if isinstance(exc, StarletteHTTPException):
        return ErrorReply(exc.status_code, str(exc.detail), "validation", headers=dict(exc.headers or {}))
    if isinstance(exc, RequestValidationError):
        return _validation_reply(exc)
    found = next(((status, kind) for cls, status, kind in _TABLE if isinstance(exc, cls)), None)
    if found is None:
        logger.error("unexpected error while serving a request", exc_info=exc)
        return ErrorReply(500, f"internal error: {type(exc).__name__}", "generation")
    status, error_type = found
    if isinstance(exc, InvalidRequestError):
        return ErrorReply(status, str(exc), error_type, exc.field)
    if isinstance(exc, ConfigError):
        return ErrorReply(status, str(exc), error_type, exc.key)
    if isinstance(exc, UnauthorizedError):
        return ErrorReply(status, str(exc), error_type, headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, CapacityError):
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return ErrorReply(capacity_status, str(exc), error_type, headers={"Retry-After": retry})
    return ErrorReply(status, str(exc) or type(exc).__name__, error_type)


def _validation_reply(exc: RequestValidationError) -> ErrorReply:
    problems = exc.errors()
    if not problems:
        return ErrorReply(400, "invalid request", "validation")
    first = problems[0]
    name = _field_name(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        message = f"unknown field '{name}'"
    elif first.get("type") == "json_invalid":
        name, message = "body", f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    elif first.get("type") == "missing":
        message = f"'{name}' is required"
    else:
        message = f"{name}: {first['msg']}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return ErrorReply(400, message, "validation", name)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def _field_name(loc: Any) -> str:
    """``("body", "parameters", "stop", 0)`` -> ``parameters.stop[0]``; union member tags dropped."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part == "body" and not name or part in _TYPE_TAGS or "[" in part or "(" in part:
            continue
        else:
            name += f".{part}" if name else part
    return name or "body"


def request_failure(delta: RequestDelta) -> LMServeError:
    """The error for a delta that ended its request with ``finish_reason="error"``: 507 when the
    engine ran out of memory for it, 400 when it could not compile the request's grammar, else
    ``GenerationError`` (500)."""
    reason = delta.error or "no reason given"
    if delta.error_kind == "invalid_request":
        return InvalidRequestError(delta.error_field or "structured_outputs", reason)
    if delta.error_kind == "out_of_memory":
        return OutOfMemoryError(f"the engine ran out of memory for this request: {reason}")
    return GenerationError(f"the engine failed this request: {reason}")


def error_response(exc: BaseException, capacity_status: int = 429) -> JSONResponse:
    reply = describe(exc, capacity_status)
    return JSONResponse(reply.body(), status_code=reply.status, headers=reply.headers)


def sse_error_event(exc: BaseException) -> str:
    """An error after a Server-Sent-Events stream began: ``event: error`` with the usual body."""
    return f"event: error\ndata: {json.dumps(describe(exc).body())}\n\n"


def openai_sse_error_event(exc: BaseException) -> str:
    """An error after an OpenAI stream began: the error event, then ``data: [DONE]``, which OpenAI
    clients wait for to know the stream is over."""
    return sse_error_event(exc) + "data: [DONE]\n\n"


def jsonlines_error(exc: BaseException) -> str:
    """An error after a JSON-lines stream began: one last line with the usual body."""
    return json.dumps(describe(exc).body()) + "\n"


def install_error_handlers(app: FastAPI, capacity_status: Callable[[], int] = lambda: 429) -> None:
    """Make ``app`` answer every exception through this table; ``capacity_status()`` says whether a
    full queue is 429 or 503 (it is known only once the configuration has loaded)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, capacity_status())

    for cls in (Exception, LMServeError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(cls, handle)
