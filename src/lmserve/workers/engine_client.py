"""The frontend's handle on one engine process (one replica): start it, feed it, read its output.

All methods run on the frontend's event loop. Requests go out on a PUSH socket (sent without
waiting, so an abort can be sent from a cancelled task); one background task reads the engine's
output and hands each delta to the ``RequestStream`` of its request. The process is watched through
its sentinel, so a crashed or killed engine is noticed at once: every request in flight then ends
with ``EngineFailedError`` and the replica's state becomes ``FAILED``. A frozen engine (stopped, not
dead) is noticed by its silence: it sends a heartbeat from a thread of its own while it lives, so
``heartbeat_timeout`` seconds without any message mean it is frozen, whatever its steps take; it is
then failed the same way and killed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from lmserve.engine.outputs import RequestDelta
from lmserve.engine.protocol import EngineStats, ModelInfo
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import EngineDeadError, EngineFailedError, ShuttingDownError
from lmserve.spawning import start_spawned
from lmserve.workers.engine_process import run_engine_process
from lmserve.workers.messages import (
    Abort,
    AddRequest,
    Deltas,
    EngineFailed,
    EngineSpec,
    Heartbeat,
    Message,
    Ready,
    RequestFailed,
    Shutdown,
    Stats,
    StatsQuery,
    decode,
    encode,
    encode_spec,
)
from lmserve.workers.placement import Placement
from lmserve.workers.replica_state import ReplicaState
from lmserve.workers.request_stream import RequestStream

logger = logging.getLogger("lmserve.engine_client")
_EXIT_GRACE_S = 0.2  # after the process exits, how long its last message (EngineFailed) may take


def heartbeat_interval(timeout: float) -> float:
    """How often an engine beats, and its watcher looks, for a given silence deadline: several beats
    fit in one deadline, so one late beat (a busy host) is not silence."""
    return min(1.0, timeout / 4)


class EngineClient:
    """One engine process and the requests in flight on it.

    ``start()`` spawns the process; ``wait_ready()`` returns its ``ModelInfo`` once the model has
    loaded. ``submit()``/``generate()`` run requests, ``abort()`` stops one, ``stats()`` asks the
    engine for an ``EngineStats`` snapshot, ``shutdown()`` stops the process.
    """

    def __init__(self, spec: EngineSpec, name: str = "replica-0", placement: Placement | None = None,
                 heartbeat_timeout: float | None = None) -> None:
        self.spec, self.name, self.placement = spec, name, placement
        self.heartbeat_timeout = heartbeat_timeout  # None: never judge the engine by its silence
        self.state = ReplicaState.LOADING
        self.model_info: ModelInfo | None = None
        self.error: BaseException | None = None
        self.on_failure: list[Callable[[EngineClient], None]] = []
        self._streams: dict[str, RequestStream] = {}
        self._stats_waiters: dict[int, asyncio.Future[EngineStats]] = {}
        self._query_ids = itertools.count()
        self._process: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: asyncio.Future[ModelInfo] | None = None
        self._last_heard = 0.0  # event loop time of the engine's last message

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the engine process. Returns at once; the model loads in the background."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        # A load failure nobody waits for is reported through ``state``, not as an unread exception.
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._dir = Path(tempfile.mkdtemp(prefix="lmserve-"))
        inbox, outbox = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        # Sockets of pyzmq's process-wide contexts, never one per client: a client collected without
        # shutdown() had its own context's destructor wait forever on sockets the collector had
        # already unlinked from it, hanging whatever code triggered the collection.
        self._output = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self._output.bind(outbox)
        self._input: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)  # queue, never block: sends happen on the event loop
        self._input.connect(inbox)
        spawn = multiprocessing.get_context("spawn")
        where = self.placement
        env, cpus = (dict(where.env), list(where.cpus) if where.cpus is not None else None) if where else ({}, None)
        beat = heartbeat_interval(self.heartbeat_timeout) if self.heartbeat_timeout else None
        self._process = spawn.Process(target=run_engine_process,
                                      args=(encode_spec(self.spec), inbox, outbox, env, cpus, beat),
                                      name=f"lmserve-engine-{self.name}")  # fmt: skip
        start_spawned(self._process)
        loop.add_reader(self._process.sentinel, self._on_process_exit)
        self._tasks.append(asyncio.create_task(self._read_output(), name=f"{self.name}-output"))
        if self.heartbeat_timeout:
            self._tasks.append(asyncio.create_task(self._watch_heartbeat(self.heartbeat_timeout),
                                                   name=f"{self.name}-heartbeat"))  # fmt: skip
        logger.info("%s: engine process %d started", self.name, self._process.pid)

    async def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        """The model's facts, once loaded. Raises the load error, or ``EngineDeadError`` after
        ``timeout`` seconds (the process is then stopped)."""
        assert self._ready is not None, "start() first"
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            self._fail(EngineDeadError(f"the engine did not load within {timeout:g}s (model_loading_timeout)"))
            self._kill()
            raise self.error from None  # type: ignore[misc]

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process (politely, then by force) and fail anything still in flight."""
        if self.state is ReplicaState.STOPPED or self._process is None:
            return
        was_ready = self.state is ReplicaState.READY
        self.state = ReplicaState.STOPPED
        self._fail_streams(ShuttingDownError("the server is shutting down"))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ShuttingDownError("the server is shutting down"))
        if was_ready:  # a loading engine reads no messages until it is ready: stop it by signal
            self._send(Shutdown())
            await asyncio.to_thread(self._process.join, timeout)
        self._kill()
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._output.close(linger=0)
        self._input.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet finished, aborted or failed."""
        return len(self._streams)

    # ---- requests --------------------------------------------------------------------------------

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
               deadline: float | None = None) -> RequestStream:
        """Send one request; its output arrives on the returned stream. ``deadline`` is an event loop
        time (``loop.time()``) after which the stream raises ``RequestTimeoutError``."""
        if self.state is not ReplicaState.READY:
            raise self._not_ready_error()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream = RequestStream(request_id, deadline, on_close=self.abort)
        self._streams[request_id] = stream
        self._send(AddRequest(request_id, list(prompt_token_ids), params))
        return stream

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       deadline: float | None = None) -> AsyncIterator[RequestDelta]:
        """The deltas of one request; leaving the loop early aborts the request in the engine."""
        stream = self.submit(prompt_token_ids, params, request_id, deadline)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; its stream gets nothing more. Never blocks."""
        if self._streams.pop(request_id, None) is not None and self.state is ReplicaState.READY:
            self._send(Abort([request_id]))

    def abort_all(self, error: BaseException) -> None:
        """Abort every request in flight; each consumer receives ``error`` instead of more output."""
        streams, self._streams = list(self._streams.values()), {}
        if streams and self.state is ReplicaState.READY:
            self._send(Abort([stream.request_id for stream in streams]))
        for stream in streams:
            stream.fail(error)

    async def stats(self, timeout: float = 5.0) -> EngineStats:
        """A snapshot of the engine's counters. The engine answers between steps."""
        if self.state is not ReplicaState.READY:
            raise self._not_ready_error()
        query_id = next(self._query_ids)
        waiter: asyncio.Future[EngineStats] = asyncio.get_running_loop().create_future()
        self._stats_waiters[query_id] = waiter
        self._send(StatsQuery(query_id))
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._stats_waiters.pop(query_id, None)

    # ---- internals -------------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        self._input.send(encode(message), zmq.NOBLOCK)

    def _not_ready_error(self) -> EngineDeadError:
        if self.state is ReplicaState.LOADING:
            return EngineDeadError("the model is still loading")
        if self.state is ReplicaState.STOPPED:
            return ShuttingDownError("the server is shutting down")
        return EngineFailedError(f"the engine has failed: {self.error}")

    async def _read_output(self) -> None:
        while True:
            data = await self._output.recv()
            self._last_heard = asyncio.get_running_loop().time()
            try:
                message = decode(data)
            except ValueError:
                logger.exception("%s: dropping a malformed engine message", self.name)
                continue
            self._dispatch(message)

    async def _watch_heartbeat(self, timeout: float) -> None:
        """Fail and kill the engine once it has been ready and silent for ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        tick = heartbeat_interval(timeout)
        due = loop.time() + tick
        while self.state in (ReplicaState.LOADING, ReplicaState.READY):
            await asyncio.sleep(tick)
            now = loop.time()
            stalled, due = now - due > tick, now + tick
            # After this event loop itself stalled, beats may be waiting unread in the socket: let
            # the reader have its turn before judging the engine by its silence.
            if self.state is not ReplicaState.READY or stalled or now - self._last_heard <= timeout:
                continue
            self._fail(EngineFailedError(f"the engine stopped responding (no heartbeat for {now - self._last_heard:.1f}s, "
                                       f"heartbeat_timeout {timeout:g}s); its process was killed"))  # fmt: skip
            self._process.kill()  # SIGKILL ends a stopped process too; the sentinel reaps it
            return

    def _dispatch(self, message: Message) -> None:
        match message:
            case Deltas(deltas=deltas, queue_time_s=queue_time):
                for delta in deltas:
                    stream = self._streams.get(delta.request_id)
                    if stream is None:  # aborted or failed already
                        continue
                    stream.put(delta, queue_time.get(delta.request_id))
                    if delta.finished:
                        del self._streams[delta.request_id]
            case RequestFailed(request_id=rid, error=error):
                stream = self._streams.pop(rid, None)
                if stream is not None:
                    stream.fail(error.to_exception())
            case Stats(query_id=qid, stats=stats):
                waiter = self._stats_waiters.get(qid)
                if waiter is not None and not waiter.done():
                    waiter.set_result(stats)
            case Heartbeat():
                pass  # its arrival is all it says (see ``_read_output``)
            case Ready(model_info=info):
                self.model_info, self.state = info, ReplicaState.READY
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(info)
            case EngineFailed(error=error):
                self._fail(error.to_exception())
            case _:
                logger.error("%s: unexpected message from the engine: %r", self.name, message)

    def _on_process_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        if self.state is not ReplicaState.STOPPED:
            asyncio.get_running_loop().call_later(_EXIT_GRACE_S, self._after_exit)

    def _after_exit(self) -> None:
        self._process.join(0)
        code = self._process.exitcode
        if self.state in (ReplicaState.LOADING, ReplicaState.READY):
            self._fail(EngineFailedError(f"the engine process exited unexpectedly (exit code {code})"))

    def _fail(self, error: BaseException) -> None:
        if self.state in (ReplicaState.FAILED, ReplicaState.STOPPED):
            return
        self.state, self.error = ReplicaState.FAILED, error
        logger.error("%s: engine failed: %s", self.name, error)
        dead = error if isinstance(error, EngineDeadError) else EngineFailedError(f"the engine failed: {error}")
        self._fail_streams(dead)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        for callback in self.on_failure:
            callback(self)

    def _fail_streams(self, error: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.fail(error)
        for waiter in self._stats_waiters.values():
            if not waiter.done():
                waiter.set_exception(error)

    def _kill(self) -> None:
        # SIGKILL: the engine ignores SIGTERM (it must outlive a process-group SIGTERM while we drain).
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
