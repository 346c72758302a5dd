"""``HandlerClient``: the frontend's handle on one handler worker process (one replica).

It has the lifecycle interface of ``EngineClient`` (``start``, ``wait_ready``, ``shutdown``,
``state``, ``pid``, ``error``, ``on_failure``, ``outstanding``, ``abort_all``, ``stats``), so the
``Launcher`` starts, supervises and restarts it as it does an engine. ``run(items)`` sends one batch
and returns one ``Reply`` per request, or raises for the whole batch:

- the handler raised or broke its contract: ``HandlerError`` (424) with its message;
- the process died (``os._exit``, a signal): ``HandlerError`` naming the exit code; the worker is
  failed, so the launcher restarts it;
- no answer (or no stream step) within ``predict_timeout``: ``RequestTimeoutError`` (504); the
  worker is stuck in user code, so it is killed and restarted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from lmserve.engine.protocol import EngineStats, ModelInfo
from lmserve.errors import EngineDeadError, HandlerError, RequestTimeoutError
from lmserve.handlers.messages import (
    BatchChunk,
    BatchDone,
    BatchEnd,
    BatchFailed,
    HandlerSpec,
    Item,
    ItemOutput,
    RunBatch,
    Stop,
    WorkerLoadFailed,
    WorkerReady,
    decode,
    encode,
)
from lmserve.handlers.worker_process import run_handler_worker
from lmserve.spawning import start_spawned
from lmserve.workers.engine_client import ReplicaState
from lmserve.workers.placement import Placement

logger = logging.getLogger("lmserve.handlers")
_EXIT_GRACE_S = 0.2


class ChunkStream:
    """One request's part of a streamed answer: its pieces of bytes, then the end (or an error)."""

    def __init__(self, content_type: str) -> None:
        self.content_type = content_type
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

    def put(self, item: bytes | BaseException | None) -> None:
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass(frozen=True)
class Reply:
    """One request's answer: a whole body (``output``) or a stream."""

    output: ItemOutput | None = None
    stream: ChunkStream | None = None


class _Batch:
    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.size, self.first, self.done = size, loop.create_future(), loop.create_future()
        self.streams: list[ChunkStream] | None = None
        self.last_activity = loop.time()

    def fail(self, error: BaseException) -> None:
        for future in (self.first, self.done):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a failed batch nobody awaits is not an unread error
        for stream in self.streams or ():
            stream.put(error)


class HandlerClient:
    """See the module docstring. ``python`` runs the worker with another interpreter (a model venv)."""

    def __init__(self, spec: HandlerSpec, info: ModelInfo, predict_timeout_s: float, name: str = "replica-0",
                 placement: Placement | None = None, python: str | None = None) -> None:  # fmt: skip
        self.spec, self.name, self.placement, self.python = spec, name, placement, python
        self.predict_timeout_s = predict_timeout_s
        self.state = ReplicaState.LOADING
        self.model_info: ModelInfo | None = None
        self._info = info
        self.error: BaseException | None = None
        self.on_failure: list[Callable[[Any], None]] = []
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count()
        self._process: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: asyncio.Future[ModelInfo] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._dir = Path(tempfile.mkdtemp(prefix="lmserve-handler-"))
        address = f"ipc://{self._dir}/pair"
        self._sock = zmq.asyncio.Context.instance().socket(zmq.PAIR)  # process-wide, as in EngineClient.start
        self._sock.bind(address)
        ctx = multiprocessing.get_context("spawn")
        where = self.placement
        env, cpus = (dict(where.env), list(where.cpus) if where.cpus is not None else None) if where else ({}, None)
        self._process = ctx.Process(target=run_handler_worker, args=(self.spec, address, env, cpus),
                                    name=f"lmserve-handler-{self.name}")  # fmt: skip
        start_spawned(self._process, self.python)  # the model's venv for this worker only
        loop.add_reader(self._process.sentinel, self._on_process_exit)
        self._tasks.append(asyncio.create_task(self._read(), name=f"{self.name}-read"))
        self._tasks.append(asyncio.create_task(self._watch(), name=f"{self.name}-watch"))
        logger.info("%s: handler worker %d started (%s)", self.name, self._process.pid, self.spec.entry)

    async def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        assert self._ready is not None, "start() first"
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            self._fail(EngineDeadError(f"the handler did not initialise within {timeout:g}s (model_loading_timeout)"))
            self._kill()
            raise self.error from None  # type: ignore[misc]

    async def shutdown(self, timeout: float = 5.0) -> None:
        if self.state is ReplicaState.STOPPED or self._process is None:
            return
        was_ready, self.state = self.state is ReplicaState.READY, ReplicaState.STOPPED
        self._fail_batches(EngineDeadError("the server is shutting down"))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineDeadError("the server is shutting down"))
        if was_ready:
            await self._sock.send(encode(Stop()))
            await asyncio.to_thread(self._process.join, timeout)
        self._kill()
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sock.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def outstanding(self) -> int:
        """Requests in the batches this worker is running."""
        return sum(batch.size for batch in self._batches.values())

    def abort_all(self, error: BaseException) -> None:
        self._fail_batches(error)

    async def stats(self, timeout: float = 5.0) -> EngineStats:
        """A handler has no engine counters; the outstanding requests count as running."""
        return EngineStats(num_running=self.outstanding)

    # ---- batches ---------------------------------------------------------------------------------

    async def run(self, items: list[Item]) -> tuple[list[Reply], asyncio.Future[None]]:
        """Run one batch: one ``Reply`` per item, in order, and a future done when the worker is
        done with the batch (at once, or at a stream's end). Raises for the whole batch (see above)."""
        if self.state is not ReplicaState.READY:
            raise EngineDeadError(f"the handler worker {self.name} is {self.state.value}")
        batch_id = next(self._ids)
        batch = self._batches[batch_id] = _Batch(len(items), asyncio.get_running_loop())
        await self._sock.send(encode(RunBatch(batch_id, items)))
        try:
            first = await batch.first
        except BaseException:
            self._batches.pop(batch_id, None)
            raise
        if isinstance(first, BatchDone):
            return [Reply(output=output) for output in first.outputs], batch.done
        assert batch.streams is not None
        return [Reply(stream=stream) for stream in batch.streams], batch.done

    # ---- internals -------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                message = decode(data)
            except ValueError:
                logger.exception("%s: dropping a malformed handler message", self.name)
                continue
            self._dispatch(message)

    def _dispatch(self, message: object) -> None:
        loop = asyncio.get_running_loop()
        match message:
            case WorkerReady(pid=_):
                self.model_info, self.state = self._info, ReplicaState.READY
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(self._info)
            case WorkerLoadFailed(error=error):
                self._fail(HandlerError(f"the handler failed to initialise: {error}"))
            case BatchDone(batch_id=bid):
                batch = self._batches.pop(bid, None)
                if batch is not None:
                    batch.first.set_result(message)
                    batch.done.set_result(None)
            case BatchFailed(batch_id=bid, error=error):
                batch = self._batches.pop(bid, None)
                if batch is not None:
                    batch.fail(HandlerError(error))
            case BatchChunk(batch_id=bid, pieces=pieces, content_type=content_type):
                batch = self._batches.get(bid)
                if batch is None:
                    return
                batch.last_activity = loop.time()
                if batch.streams is None:
                    batch.streams = [ChunkStream(content_type) for _ in range(batch.size)]
                    batch.first.set_result(message)
                for stream, piece in zip(batch.streams, pieces, strict=False):
                    if piece is not None:
                        stream.put(piece)
            case BatchEnd(batch_id=bid):
                batch = self._batches.pop(bid, None)
                if batch is not None:
                    for stream in batch.streams or ():
                        stream.put(None)
                    batch.done.set_result(None)

    async def _watch(self) -> None:
        """Fail a batch that made no progress for ``predict_timeout`` and kill its stuck worker."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(0.1, self.predict_timeout_s / 4))
            stale = [bid for bid, b in self._batches.items() if loop.time() - b.last_activity > self.predict_timeout_s]
            if not stale:
                continue
            error = RequestTimeoutError(f"the handler did not answer within predict_timeout "
                                        f"({self.predict_timeout_s:g}s); its worker is restarted")  # fmt: skip
            for bid in stale:
                self._batches.pop(bid).fail(error)
            self._fail(EngineDeadError(f"the handler hung past predict_timeout ({self.predict_timeout_s:g}s)"))
            self._kill()

    def _on_process_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        if self.state is not ReplicaState.STOPPED:
            asyncio.get_running_loop().call_later(_EXIT_GRACE_S, self._after_exit)

    def _after_exit(self) -> None:
        self._process.join(0)
        code = self._process.exitcode
        self._fail(HandlerError(f"the handler's worker process exited (exit code {code})"))

    def _fail(self, error: BaseException) -> None:
        if self.state in (ReplicaState.FAILED, ReplicaState.STOPPED):
            return
        self.state, self.error = ReplicaState.FAILED, error
        logger.error("%s: handler worker failed: %s", self.name, error)
        self._fail_batches(error if isinstance(error, HandlerError | RequestTimeoutError) else HandlerError(str(error)))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        for callback in self.on_failure:
            callback(self)

    def _fail_batches(self, error: BaseException) -> None:
        batches, self._batches = list(self._batches.values()), {}
        for batch in batches:
            batch.fail(error)

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
