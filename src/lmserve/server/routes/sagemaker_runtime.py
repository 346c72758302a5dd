"""The SageMaker Runtime API, served locally, so application code written against the managed service
runs unchanged (``boto3.client("sagemaker-runtime", endpoint_url=...)``).

| route | answer |
|---|---|
| ``POST /endpoints/{name}/invocations`` (``InvokeEndpoint``) | what ``/invocations`` answers for the model called ``name`` |
| ``POST /endpoints/{name}/invocations-response-stream`` (``InvokeEndpointWithResponseStream``) | the same bytes, cut into ``PayloadPart`` events of the AWS event-stream framing as they are made |

Every model lmserve serves is an endpoint of its own name (``--served-name``). The body is the LMI
JSON body (``application/json``); with ``"stream": true`` the response stream carries JSON lines,
exactly as the managed containers' streaming does. Errors carry the status of the one error table,
plus the ``x-amzn-ErrorType`` header and ``message`` field that AWS SDKs read, so an SDK raises its
usual ``ValidationError`` / ``ModelError`` / ``ServiceUnavailable`` with lmserve's message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator

import pydantic
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmserve.errors import InvalidRequestError, ModelNotFoundError
from lmserve.server import eventstream
from lmserve.server.errors import describe
from lmserve.server.protocol.lmi import InvocationRequest
from lmserve.server.routes import registry_of
from lmserve.server.routes.handler import handler_response
from lmserve.server.routes.sagemaker import invoke
from lmserve.server.runtime import ModelRuntime

router = APIRouter(tags=["SageMaker Runtime"])
EVENT_STREAM = "application/vnd.amazon.eventstream"
_JSON_TYPES = ("application/json", "application/jsonlines", "application/x-jsonlines", "text/json")
# The SageMaker Runtime error names AWS SDKs turn into exceptions; other statuses are InternalFailure.
# The body is read by hand (any JSON content type, SDK-shaped errors); the schema is still published.
_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/InvocationRequest"}}}}}  # fmt: skip
_AWS_ERROR_TYPES = {400: "ValidationError", 401: "ValidationError", 403: "ValidationError", 404: "ValidationError",
                    413: "ValidationError", 424: "ModelError", 429: "ThrottlingException", 503: "ServiceUnavailable",
                    504: "ModelError", 507: "ModelError"}  # fmt: skip


@router.post("/endpoints/{model_name}/invocations", openapi_extra=_BODY)
async def invoke_endpoint(model_name: str, request: Request) -> Response:
    """``InvokeEndpoint``: the model called ``model_name`` (the endpoint name) answers the LMI body."""
    try:
        response = await _answer(request, model_name)
    except Exception as exc:
        return _aws_error(request, exc)
    response.headers["x-Amzn-Invoked-Production-Variant"] = "AllTraffic"
    return response


@router.post("/endpoints/{model_name}/invocations-response-stream", openapi_extra=_BODY)
async def invoke_endpoint_with_response_stream(model_name: str, request: Request) -> Response:
    """``InvokeEndpointWithResponseStream``: the answer's bytes as ``PayloadPart`` events."""
    try:
        response = await _answer(request, model_name)
    except Exception as exc:
        return _aws_error(request, exc)
    inner_type = response.media_type or "application/json"
    headers = {"X-Amzn-SageMaker-Content-Type": inner_type, "x-Amzn-Invoked-Production-Variant": "AllTraffic"}
    if isinstance(response, StreamingResponse):
        # Re-frame in place: the response keeps closing its requests however the stream ends.
        response.body_iterator = _parts(response.body_iterator)
        response.headers["content-type"] = EVENT_STREAM
        response.headers.update(headers)
        return response
    return Response(eventstream.payload_part(bytes(response.body)), media_type=EVENT_STREAM, headers=headers)


async def _answer(request: Request, model_name: str) -> Response:
    """A model served by a handler answers any body; the text-generation handler reads the LMI body."""
    runtime = _endpoint(request, model_name)
    handler = runtime.ready_handler()
    if handler is not None:
        return await handler_response(handler, request)
    return await invoke(runtime, request, await _body(request))


def _endpoint(request: Request, name: str) -> ModelRuntime:
    runtime = registry_of(request).find(name)
    if runtime is None:
        served = ", ".join(f"'{rt.name}'" for rt in registry_of(request).models) or "none"
        raise ModelNotFoundError(f"endpoint '{name}' is not served here: each model is an endpoint of its "
                                 f"own name (--served-name); served: {served}")  # fmt: skip
    return runtime


async def _body(request: Request) -> InvocationRequest:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in _JSON_TYPES:
        raise InvalidRequestError("ContentType", f"'{content_type}' is not accepted: send the LMI JSON body as "
                                  "application/json")  # fmt: skip
    try:
        return InvocationRequest.model_validate_json(await request.body())
    except pydantic.ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _parts(chunks: AsyncIterable[str | bytes | memoryview]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield eventstream.payload_part(chunk.encode() if isinstance(chunk, str) else bytes(chunk))
    except Exception as exc:  # the dialect's own error line normally ends the stream; this is the backstop
        yield eventstream.exception("InternalStreamFailure", json.dumps({"Message": str(exc)}).encode())


def _aws_error(request: Request, exc: BaseException) -> JSONResponse:
    reply = describe(exc, registry_of(request).server.queue_full_status)
    headers = reply.headers | {"x-amzn-ErrorType": _AWS_ERROR_TYPES.get(reply.status, "InternalFailure")}
    return JSONResponse(reply.body() | {"message": reply.message}, status_code=reply.status, headers=headers)
