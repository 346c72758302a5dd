"""``DynamicBatcher``: request-level batching for handlers that take a batch per call.

Requests wait in one bounded queue per model. A worker that is free calls ``next_batch()``: it waits
for the first request, then up to ``max_delay_s`` for more, and takes at most ``batch_size``. Only
one worker collects at a time, so workers that are free together take consecutive batches instead of
splitting one. With the queue full (``max_queue`` requests waiting) ``submit`` raises
``CapacityError``, which the server answers 429 with ``Retry-After``.

A request whose caller went away (its future cancelled) is skipped when batches are taken. Knows
nothing of handlers or processes: a job is any item and the future its answer.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lmserve.errors import CapacityError

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Job(Generic[T, R]):
    """One request: the item to hand over, the future its caller awaits, and when it arrived."""

    item: T
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher(Generic[T, R]):
    """See the module docstring."""

    def __init__(self, batch_size: int, max_delay_s: float, max_queue: int, retry_after_s: float = 1.0) -> None:
        if batch_size < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError(f"batch_size {batch_size} and max_queue {max_queue} must be >= 1, "
                             f"max_delay_s {max_delay_s} >= 0")  # fmt: skip
        self.batch_size, self.max_delay_s, self.max_queue = batch_size, max_delay_s, max_queue
        self.retry_after_s = retry_after_s
        self._queue: collections.deque[Job[T, R]] = collections.deque()
        self._arrived = asyncio.Event()
        self._taking = asyncio.Lock()

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken (cancelled ones included until they are skipped)."""
        return len(self._queue)

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the returned future gets its answer. Raises ``CapacityError`` when full."""
        if len(self._queue) >= self.max_queue:
            raise CapacityError(f"the model's queue is full ({self.max_queue} requests waiting, job_queue_size); "
                                "retry later", retry_after_s=self.retry_after_s)  # fmt: skip
        job: Job[T, R] = Job(item, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._arrived.set()
        return job.future

    async def next_batch(self) -> list[Job[T, R]]:
        """The next batch: at least one job, at most ``batch_size``, waiting at most ``max_delay_s``
        after the first job was taken for the batch to fill."""
        async with self._taking:
            first = await self._first()
            batch, loop = [first], asyncio.get_running_loop()
            deadline = loop.time() + self.max_delay_s
            while len(batch) < self.batch_size:
                job = self._pop_live()
                if job is not None:
                    batch.append(job)
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            return batch

    def requeue(self, jobs: list[Job[T, R]]) -> None:
        """Put jobs taken by a worker that could not run them back at the head of the queue."""
        self._queue.extendleft(reversed(jobs))
        self._arrived.set()

    def fail_all(self, error: BaseException) -> None:
        """Fail every queued job with ``error`` (shutdown, model failed)."""
        jobs, self._queue = list(self._queue), collections.deque()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    async def _first(self) -> Job[T, R]:
        while True:
            job = self._pop_live()
            if job is not None:
                return job
            self._arrived.clear()
            await self._arrived.wait()

    def _pop_live(self) -> Job[T, R] | None:
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():  # a caller that gave up cancels its future
                return job
        return None
