"""Requests to a model served by a handler (custom ``model.py`` or a default one), and the answers.

The HTTP request becomes one ``Item``: its headers (lower-case) and query parameters as properties,
``request_id`` and ``content-type`` among them, and its body as the content ``data``. The handler's
``ItemOutput`` becomes the response: its status code, its properties as headers, its body. A code
of 400 or more set by the handler (``Output.error``, ``set_code``) reaches the client as is; a
handler that raised is a 424 with its message, one that hung past ``predict_timeout`` a 504.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from lmserve.errors import HandlerError
from lmserve.handlers.client import ChunkStream, Reply
from lmserve.handlers.launcher import HandlerLauncher
from lmserve.handlers.messages import Item, ItemOutput
from lmserve.server.errors import jsonlines_error

_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding"}


def request_item(request: Request, body: bytes) -> Item:
    """The request as the handler's ``Input`` will see it."""
    properties = {name.lower(): value for name, value in request.headers.items()}
    properties |= {name: value for name, value in request.query_params.items() if name != "model_name"}
    properties["request_id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
    properties.setdefault("content-type", "application/json")
    return Item(properties, {"data": body})


async def handler_response(handler: HandlerLauncher, request: Request) -> Response:
    """Run the request through the model's batcher and handler; the handler's answer as a response."""
    reply = await handler.infer(request_item(request, await request.body()))
    if reply.stream is not None:
        return StreamingResponse(_stream(reply.stream), media_type=reply.stream.content_type)
    assert reply.output is not None
    return output_response(reply.output)


def output_response(output: ItemOutput) -> Response:
    headers = {k: v for k, v in output.properties.items() if k.lower() not in _HOP_BY_HOP and k != "content-type"}
    media_type = output.properties.get("content-type")
    return Response(output.body, status_code=output.code, headers=headers, media_type=media_type)


def json_answer(reply: Reply) -> object:
    """A handler's whole answer decoded as JSON, for routes that reshape it (OpenAI embeddings)."""
    if reply.output is None:
        raise HandlerError("the handler streamed an answer where one JSON body was expected")
    if reply.output.code >= 400:
        raise HandlerError(_error_text(reply.output))
    try:
        return json.loads(reply.output.body)
    except ValueError as exc:
        raise HandlerError(f"the handler's answer is not JSON: {exc}") from None


def _error_text(output: ItemOutput) -> str:
    try:
        return str(json.loads(output.body)["error"])
    except (ValueError, KeyError, TypeError):
        return output.body.decode("utf-8", "replace") or output.message


async def _stream(stream: ChunkStream) -> AsyncIterator[bytes]:
    """The stream's pieces; an error after it began ends it with one error line."""
    try:
        async for piece in stream:
            yield piece
    except Exception as exc:  # noqa: BLE001 - reported to the client, the stream cannot change status now
        yield jsonlines_error(exc).encode()
