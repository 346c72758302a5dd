"""What every inference route does with checked prompts: submit, time, collect, stop on disconnect.

A route tokenizes and checks its prompts (``lmserve.server.prompts``), ``start``s each request
(capacity and readiness are checked before anything is sent, so those errors keep their HTTP
status), then either ``complete``s them or streams them. Streaming routes wait for the first delta
before answering, so an error before the first token is still an HTTP error; after it, errors
become error events. A client that goes away, during the wait or the stream, aborts its requests
in the engine.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from lmserve.engine.outputs import RequestDelta, TokenLogprob
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import RequestTimeoutError
from lmserve.metrics import RequestTimer
from lmserve.server.errors import ClientDisconnectedError, request_failure
from lmserve.server.runtime import ModelRuntime
from lmserve.workers.request_stream import RequestStream

T = TypeVar("T")


@dataclass
class Completion:
    """One finished request, folded from its deltas."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt token i + 1's, when asked for
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def add(self, delta: RequestDelta) -> None:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = list(delta.prompt_logprobs)
        self.num_cached_tokens = delta.num_cached_tokens
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        self.logprobs.extend(delta.logprobs or ())
        if delta.finished:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


class TrackedStream:
    """A request's deltas with its metrics kept; ``close()`` aborts it unless it finished."""

    def __init__(self, stream: RequestStream, timer: RequestTimer, prompt_ids: list[int]) -> None:
        self.stream, self.timer, self.prompt_ids = stream, timer, prompt_ids

    def __aiter__(self) -> TrackedStream:
        return self

    async def __anext__(self) -> RequestDelta:
        try:
            delta = await self.stream.__anext__()
        except (StopAsyncIteration, asyncio.CancelledError):
            raise  # finished, or the client left (``close`` records that as an abort)
        except BaseException as exc:
            self.timer.finish("timeout" if isinstance(exc, RequestTimeoutError) else "error")
            raise
        self.timer.on_delta(delta, self.stream.queue_time_s)
        if delta.finish_reason == "error":
            raise request_failure(delta)
        return delta

    def close(self) -> None:
        if not self.stream.finished:
            self.stream.close()
            self.timer.finish("abort")


def start(rt: ModelRuntime, prompt_ids: list[int], params: SamplingParams, prefix: str = "req") -> TrackedStream:
    """Submit one request to the least-loaded replica, with ``predict_timeout`` as its deadline."""
    router = rt.ready_router()
    deadline = asyncio.get_running_loop().time() + rt.config.workers.predict_timeout_s
    stream = router.submit(prompt_ids, params, f"{prefix}-{uuid.uuid4().hex}", deadline)
    return TrackedStream(stream, rt.metrics.request(len(prompt_ids)), prompt_ids)


def start_all(rt: ModelRuntime, jobs: Sequence[tuple[list[int], SamplingParams]],
              prefix: str = "req") -> list[TrackedStream]:
    """``start`` each job; if one cannot start, the ones already started are aborted."""
    streams: list[TrackedStream] = []
    try:
        for prompt_ids, params in jobs:
            streams.append(start(rt, prompt_ids, params, prefix))
    except BaseException:
        close_all(streams)
        raise
    return streams


def close_all(streams: Sequence[TrackedStream]) -> None:
    for stream in streams:
        stream.close()


async def complete(request: Request, streams: Sequence[TrackedStream]) -> list[Completion]:
    """Run started requests to their end, together; the first error, or the client leaving, stops
    all of them."""

    async def collect(stream: TrackedStream) -> Completion:
        completion = Completion(stream.prompt_ids)
        try:
            async for delta in stream:
                completion.add(delta)
        finally:
            stream.close()
        return completion

    tasks = [asyncio.ensure_future(collect(stream)) for stream in streams]
    try:
        return await until_disconnected(request, asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        close_all(streams)


async def first_delta(request: Request, stream: TrackedStream) -> RequestDelta:
    """The first delta of a stream about to be sent; on any failure the request is aborted."""
    try:
        return await until_disconnected(request, stream.__anext__())
    except BaseException:
        stream.close()
        raise


async def first_deltas(request: Request, streams: Sequence[TrackedStream]) -> list[RequestDelta]:
    """``first_delta`` of several streams; if one fails, all are aborted."""
    try:
        return list(await asyncio.gather(*(first_delta(request, s) for s in streams)))
    except BaseException:
        close_all(streams)
        raise


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it and raising ``ClientDisconnectedError`` if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # let it unwind: that aborts its requests
    raise ClientDisconnectedError("the client went away")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
