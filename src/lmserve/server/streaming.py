"""Streaming responses: Server-Sent Events and JSON lines, per-token events, and error endings.

Every stream goes through ``guarded``: an exception after the first byte becomes the dialect's
error event (never a silent cut), and however the stream ends (finished, failed, client gone) its
requests are closed, which aborts any still running in the engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lmserve.engine.outputs import RequestDelta
from lmserve.server.generation import TrackedStream, close_all
from lmserve.server.runtime import ModelRuntime

_NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its requests however the response ends, even if its body was never iterated."""

    def __init__(self, content: AsyncIterator[str], streams: Sequence[TrackedStream], media_type: str) -> None:
        super().__init__(content, media_type=media_type, headers=_NO_BUFFERING)
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close_all(self._streams)


def sse_response(events: AsyncIterator[str], streams: Sequence[TrackedStream]) -> StreamingResponse:
    return _ClosingStreamingResponse(events, streams, "text/event-stream")


def jsonlines_response(lines: AsyncIterator[str], streams: Sequence[TrackedStream],
                       media_type: str = "application/jsonlines") -> StreamingResponse:  # fmt: skip
    return _ClosingStreamingResponse(lines, streams, media_type)


def sse_data(payload: Any) -> str:
    """One SSE event carrying ``payload`` as JSON (or as is, for ``[DONE]``)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def guarded(chunks: AsyncIterator[str], on_error: Callable[[BaseException], str],
                  streams: Sequence[TrackedStream]) -> AsyncIterator[str]:
    """``chunks``, then ``on_error(exc)`` if they fail; ``streams`` are closed however it ends."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:
        yield on_error(exc)
    finally:
        close_all(streams)


async def deltas_from(first: RequestDelta, stream: TrackedStream) -> AsyncIterator[RequestDelta]:
    """The already received first delta, then the rest of the stream."""
    yield first
    if not first.finished:
        async for delta in stream:
            yield delta


async def merged(firsts: Sequence[RequestDelta], streams: Sequence[TrackedStream]
                 ) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Deltas of several streams as they come, each tagged with its stream's index."""
    if len(streams) == 1:
        async for delta in deltas_from(firsts[0], streams[0]):
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, RequestDelta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for delta in deltas_from(firsts[index], streams[index]):
                queue.put_nowait((index, delta))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as streamed: a delta with several tokens gives its whole text to the last
    one, so that the streamed texts always add up to the generated text."""

    id: int
    text: str
    logprob: float | None
    top: tuple[tuple[int, float], ...]
    special: bool


def token_events(rt: ModelRuntime, delta: RequestDelta) -> list[TokenEvent]:
    special = rt.tokenizer.all_special_ids if rt.tokenizer is not None else frozenset()
    events = []
    last = len(delta.token_ids) - 1
    for k, token in enumerate(delta.token_ids):
        lp = delta.logprobs[k] if delta.logprobs is not None and k < len(delta.logprobs) else None
        events.append(TokenEvent(token, delta.text if k == last else "", lp.logprob if lp else None,
                                 lp.top if lp else (), token in special))  # fmt: skip
    return events


def token_text(rt: ModelRuntime, token_id: int) -> str:
    """The text of one token on its own (special tokens included), as logprob listings show it."""
    assert rt.tokenizer is not None
    return rt.tokenizer.decode([token_id], skip_special_tokens=False)


def tgi_finish_reason(finish_reason: str | None, stop_reason: str | int | None) -> str:
    """TGI's (and LMI's) names: ``length``, ``eos_token``, ``stop_sequence``."""
    if finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
