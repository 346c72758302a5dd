"""``RequestStream``: the output of one request in flight, as an async iterator of deltas."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lmserve.engine.outputs import RequestDelta
from lmserve.errors import RequestTimeoutError


class RequestStream:
    """Deltas of one request, in order, ending after the one with a ``finish_reason``.

    The engine client ``put``s deltas and ``fail``s the stream; the consumer iterates. Iteration
    raises the failure (``EngineDeadError``, ``InvalidRequestError``, ...) where it happened, and
    ``RequestTimeoutError`` once ``deadline`` (event loop time) passes. ``close()`` before the end
    aborts the request in the engine; it is safe to call from a cancelled task and more than once.
    ``queue_time_s`` is set with the first delta: seconds from the engine receiving the request to
    the start of the step that produced its first output.
    """

    def __init__(self, request_id: str, deadline: float | None, on_close: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.deadline = deadline
        self.queue_time_s: float | None = None
        self.finished = False
        self._on_close = on_close
        self._queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()

    # ---- producer side ---------------------------------------------------------------------------

    def put(self, delta: RequestDelta, queue_time_s: float | None = None) -> None:
        if queue_time_s is not None and self.queue_time_s is None:
            self.queue_time_s = queue_time_s
        self._queue.put_nowait(delta)

    def fail(self, error: BaseException) -> None:
        self._queue.put_nowait(error)

    # ---- consumer side ---------------------------------------------------------------------------

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finished:
            raise StopAsyncIteration
        if self._queue.empty() or self._past_deadline():
            item = await self._wait()
        else:
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def _past_deadline(self) -> bool:
        return self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline

    async def _wait(self) -> RequestDelta | BaseException:
        if self.deadline is None:
            return await self._queue.get()
        try:
            async with asyncio.timeout_at(self.deadline):
                return await self._queue.get()
        except TimeoutError:
            self.close()
            raise RequestTimeoutError("the request ran past predict_timeout and was stopped") from None

    def close(self) -> None:
        """Abort the request in the engine unless it already ended."""
        if not self.finished:
            self.finished = True
            self._on_close(self.request_id)
