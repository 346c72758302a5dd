"""``HandlerLauncher``: a model served by a handler (custom ``model.py`` or a default one) in
worker processes that are replicas like an engine's, fed by one dynamic batcher.

The ``Launcher`` starts, supervises (restart with backoff, ``retry_threshold``) and scales the
workers exactly as it does engines; this subclass only swaps the process (a ``HandlerClient``) and
adds, per replica, a dispatch loop: while the replica is ready, take the next batch from the model's
``DynamicBatcher`` and run it there, one batch at a time (a streamed batch holds its worker until the
stream ends). Every request of a failed batch gets that batch's error; the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol, cast

from lmserve.batching import DynamicBatcher, Job
from lmserve.config.settings import BatchingConfig, WorkerConfig
from lmserve.engine.protocol import ModelInfo
from lmserve.errors import EngineDeadError
from lmserve.handlers.client import HandlerClient, Reply
from lmserve.handlers.messages import HandlerSpec, Item
from lmserve.workers.engine_client import EngineClient, ReplicaState
from lmserve.workers.launcher import Backoff, Launcher
from lmserve.workers.messages import EngineSpec
from lmserve.workers.placement import Devices
from lmserve.workers.replica import Replica

logger = logging.getLogger("lmserve.handlers")
_IDLE_S = 0.02  # how often a dispatch loop looks again at a replica that is not ready


class BatchObserver(Protocol):
    """Told about every batch run: its size, each request's wait in the queue, the handler's time."""

    def __call__(self, size: int, queue_waits: list[float], handler_s: float) -> None: ...


class HandlerLauncher(Launcher):
    """See the module docstring. ``infer(item)`` queues one request and returns its ``Reply``."""

    def __init__(self, name: str, handler: HandlerSpec, engine: EngineSpec, info: ModelInfo, devices: Devices,
                 workers: WorkerConfig, batching: BatchingConfig, backoff: Backoff | None = None,
                 on_failed: Callable[[BaseException], None] | None = None, python: str | None = None,
                 observer: BatchObserver | None = None) -> None:  # fmt: skip
        super().__init__(name, engine, devices, workers, backoff, on_failed)
        self.handler, self.info, self.python, self.observer = handler, info, python, observer
        self.batcher: DynamicBatcher[Item, Reply] = DynamicBatcher(
            batching.batch_size, batching.max_batch_delay_ms / 1000.0, workers.job_queue_size)
        self._dispatchers: dict[Replica, asyncio.Task[None]] = {}

    async def infer(self, item: Item) -> Reply:
        """Queue one request and wait for its answer. Raises ``CapacityError`` when the queue is
        full, else what its batch raised (``HandlerError``, ``RequestTimeoutError``, ...)."""
        if not self.router.ready_replicas() and not any(r.state is ReplicaState.RESTARTING for r in self.replicas):
            raise EngineDeadError("no handler worker is running")
        return await self.batcher.submit(item)

    async def stop(self) -> None:
        for task in self._dispatchers.values():
            task.cancel()
        await asyncio.gather(*self._dispatchers.values(), return_exceptions=True)
        self._dispatchers.clear()
        self.batcher.fail_all(EngineDeadError("the server is shutting down"))
        await super().stop()

    # ---- Launcher hooks --------------------------------------------------------------------------

    def _new_client(self, replica: Replica) -> EngineClient:
        client = HandlerClient(self.handler, self.info, self.workers.predict_timeout_s,
                               name=f"{self.name}/{replica.name}", placement=replica.placement, python=self.python)
        # A HandlerClient has the lifecycle interface the launcher and the replica use (start,
        # wait_ready, shutdown, state, pid, error, on_failure, outstanding, abort_all, stats).
        return cast(EngineClient, client)

    async def _launch(self, replica: Replica) -> None:
        await super()._launch(replica)
        if replica not in self._dispatchers:
            self._dispatchers[replica] = asyncio.create_task(self._dispatch(replica), name=f"dispatch-{replica.name}")

    # ---- dispatch --------------------------------------------------------------------------------

    async def _dispatch(self, replica: Replica) -> None:
        try:
            while replica in self.replicas:
                if replica.state is not ReplicaState.READY:
                    await asyncio.sleep(_IDLE_S)
                    continue
                jobs = await self.batcher.next_batch()
                client = cast(HandlerClient | None, replica.client)
                if replica.state is not ReplicaState.READY or client is None:  # it failed while we waited
                    self.batcher.requeue(jobs)
                    continue
                replica.requests_total += len(jobs)
                try:
                    await self._run(client, jobs)
                except asyncio.CancelledError:  # stopping: nobody will run these any more
                    _fail(jobs, EngineDeadError("the server is shutting down"))
                    raise
        finally:
            self._dispatchers.pop(replica, None)

    async def _run(self, client: HandlerClient, jobs: list[Job[Item, Reply]]) -> None:
        started = time.perf_counter()
        try:
            replies, done = await client.run([job.item for job in jobs])
        except Exception as exc:  # noqa: BLE001 - the batch's error is every one of its requests' error
            _fail(jobs, exc)
            self._observe(jobs, started)
            return
        for job, reply in zip(jobs, replies, strict=True):
            if not job.future.done():
                job.future.set_result(reply)
        await asyncio.gather(done, return_exceptions=True)  # a stream holds the worker until its end
        self._observe(jobs, started)

    def _observe(self, jobs: list[Job[Item, Reply]], started: float) -> None:
        if self.observer is not None:
            self.observer(len(jobs), [started - job.enqueued for job in jobs], time.perf_counter() - started)


def _fail(jobs: list[Job[Item, Reply]], error: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)
