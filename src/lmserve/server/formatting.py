"""``/invocations`` answers written by a custom output formatter (``option.output_formatter`` naming a
model.py function; the contract is in ``lmserve.handlers.output_formatter``).

Each request gets its own ``TextGenerationOutput``; every generated token is added to it and the
formatter called once, and the strings it returns are the answer, in order: streamed as they come
(``application/jsonlines``), or, without streaming, concatenated request after request. A formatter
that raises or returns something other than a string fails the request with 424 (in a stream: the
dialect's error line, after what was already sent).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from lmserve.engine.outputs import RequestDelta
from lmserve.errors import HandlerError
from lmserve.handlers.output_formatter import Formatter, TextGenerationOutput, TextInput, Token
from lmserve.server import generation as gen
from lmserve.server.errors import jsonlines_error
from lmserve.server.runtime import ModelRuntime
from lmserve.server.streaming import (
    close_all,
    deltas_from,
    guarded,
    jsonlines_response,
    tgi_finish_reason,
    token_events,
)

MEDIA_TYPE = "application/jsonlines"


def new_output(index: int, text: str, prompt_ids: list[int], parameters: dict[str, Any]) -> TextGenerationOutput:
    """The formatter's view of request ``index`` before its first token."""
    return TextGenerationOutput(request_id=index, input=TextInput(index, text, list(prompt_ids), parameters))


def format_delta(rt: ModelRuntime, formatter: Formatter, output: TextGenerationOutput, delta: RequestDelta) -> str:
    """The formatter's strings for each token of ``delta``, in order."""
    pieces = []
    events = token_events(rt, delta)
    for k, event in enumerate(events):
        last = delta.finished and k == len(events) - 1
        finish = tgi_finish_reason(delta.finish_reason, delta.stop_reason) if last else None
        output.add_token(Token(event.id, event.text, event.logprob, event.special), last, finish)
        pieces.append(_call(formatter, output))
    return "".join(pieces)


def _call(formatter: Formatter, output: TextGenerationOutput) -> str:
    name = getattr(formatter, "__name__", "output formatter")
    try:
        piece = formatter(output)
    except Exception as exc:
        raise HandlerError(f"the output formatter {name!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(piece, str):
        raise HandlerError(f"the output formatter {name!r} returned {type(piece).__name__}; it must return a str")
    return piece


async def streamed(rt: ModelRuntime, request: Request, formatter: Formatter, output: TextGenerationOutput,
                   stream: gen.TrackedStream) -> Response:  # fmt: skip
    """One request's answer, streamed as the formatter writes it."""
    first = await gen.first_delta(request, stream)

    async def pieces() -> AsyncIterator[str]:
        async for delta in deltas_from(first, stream):
            piece = format_delta(rt, formatter, output, delta)
            if piece:
                yield piece

    return jsonlines_response(guarded(pieces(), jsonlines_error, [stream]), [stream], MEDIA_TYPE)


async def whole(rt: ModelRuntime, request: Request, formatter: Formatter, outputs: Sequence[TextGenerationOutput],
                streams: Sequence[gen.TrackedStream]) -> Response:  # fmt: skip
    """Every request run to its end; their formatted strings, request after request."""

    async def collect(output: TextGenerationOutput, stream: gen.TrackedStream) -> str:
        pieces = []
        async for delta in stream:
            pieces.append(format_delta(rt, formatter, output, delta))
        return "".join(pieces)

    tasks = [asyncio.ensure_future(collect(o, s)) for o, s in zip(outputs, streams, strict=True)]
    try:
        answers = await gen.until_disconnected(request, asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        close_all(streams)
    return Response("".join(answers), media_type=MEDIA_TYPE)
