"""The handler worker process: loads a handler, initialises it, and runs the batches it is sent.

One batch at a time, in order: the batch becomes an ``Input`` (the request itself for one, else a
batch ``Input``), ``handle`` is called (awaited when it is ``async def``), and the answer goes back
as ``BatchDone``, or as ``BatchChunk`` messages and ``BatchEnd`` when it is a generator. An exception
in ``handle`` fails that batch only (``BatchFailed``, 424 with the exception's message); a crash or
a hang is the frontend's to notice (it watches the process and the ``predict_timeout``).

User code runs here, never in the frontend.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from lmserve.engine.cpu_threads import quiet_thread_waits
from lmserve.handlers.answers import HandlerContractError, answers, pieces
from lmserve.handlers.io import Input, Output
from lmserve.handlers.messages import (
    BatchChunk,
    BatchDone,
    BatchEnd,
    BatchFailed,
    HandlerSpec,
    Message,
    RunBatch,
    Stop,
    WorkerLoadFailed,
    WorkerReady,
    decode,
    encode,
)

logger = logging.getLogger("lmserve.handler_worker")
_POLL_MS = 1000  # how often an idle worker checks that its frontend is still there


def load_handle(spec: HandlerSpec) -> Callable[[Input], Any]:
    """The ``handle`` function ``spec.entry`` names: a ``.py`` file's ``handle`` (the file's folder
    goes on ``sys.path``, so it can import its neighbours) or ``module:function``."""
    for site in reversed(spec.site_dirs):
        sys.path.insert(0, site)
    if spec.entry.endswith(".py"):
        path = Path(spec.entry)
        sys.path.insert(0, str(path.parent))
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load the handler file {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
        name = "handle"
    else:
        module_name, _, name = spec.entry.partition(":")
        module = importlib.import_module(module_name)
    handle = getattr(module, name, None)
    if not callable(handle):
        raise AttributeError(f"the handler {spec.entry} defines no function {name}(inputs)")
    return handle  # type: ignore[no-any-return]


def run_handler_worker(spec: HandlerSpec, address: str, env: dict[str, str], cpus: list[int] | None) -> None:
    """Entry point of the spawned process; exits 0 after ``Stop``, 1 when the handler fails to load."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when this process stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.update(env)
    # Before the handler imports torch: OpenMP threads that spin long at barriers took the cores the
    # frontend needs between two batches (embeddings at batch_size=32 on 2 cores: 1115 against 1001
    # requests/s, at batch_size=1 no change). An operator's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    quiet_thread_waits(os.environ)
    if cpus:
        os.sched_setaffinity(0, cpus)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(address)
    worker = _Worker(sock)
    try:
        handle = load_handle(spec)
        worker.call(handle, Input(properties=spec.properties))  # the initialisation call
    except BaseException as exc:
        traceback.print_exc()
        sock.send(encode(WorkerLoadFailed(f"{type(exc).__name__}: {exc}")))
        sock.close(linger=2000)
        ctx.term()  # waits (up to the linger) until the message is out
        os._exit(1)
    sock.send(encode(WorkerReady(os.getpid())))
    worker.serve(handle)
    sock.close(linger=1000)
    ctx.term()


class _Worker:
    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.loop = asyncio.new_event_loop()  # for ``async def handle`` and async generators
        self.parent = os.getppid()

    def call(self, handle: Callable[[Input], Any], inputs: Input) -> Any:
        result = handle(inputs)
        if inspect.isawaitable(result):
            result = self.loop.run_until_complete(_awaited(result))
        return result

    def serve(self, handle: Callable[[Input], Any]) -> None:
        while True:
            if not self.sock.poll(_POLL_MS):
                if os.getppid() != self.parent:  # the frontend is gone: nobody will read our answers
                    return
                continue
            message = decode(self.sock.recv())
            if isinstance(message, Stop):
                return
            if isinstance(message, RunBatch):
                self.run(handle, message)

    def run(self, handle: Callable[[Input], Any], batch: RunBatch) -> None:
        requests = [Input(item.properties, item.content) for item in batch.items]
        inputs = requests[0] if len(requests) == 1 else Input(batch=requests)
        n = len(requests)
        try:
            result = self.call(handle, inputs)
            stream = result.stream if isinstance(result, Output) and result.stream is not None else result
            if inspect.isgenerator(stream) or inspect.isasyncgen(stream):
                self.stream(batch.batch_id, stream, n)
                return
            reply: Message = BatchDone(batch.batch_id, answers(result, n))
        except HandlerContractError as exc:
            reply = BatchFailed(batch.batch_id, f"the handler broke its contract: {exc}")
        except Exception as exc:  # noqa: BLE001 - user code: every exception fails this batch only
            logger.error("handle() raised:\n%s", traceback.format_exc())
            reply = BatchFailed(batch.batch_id, f"{type(exc).__name__}: {exc}")
        self.sock.send(encode(reply))

    def stream(self, batch_id: int, stream: Any, n: int) -> None:
        try:
            while True:
                try:
                    value = self.loop.run_until_complete(stream.__anext__()) if inspect.isasyncgen(stream) \
                        else next(stream)  # fmt: skip
                except (StopIteration, StopAsyncIteration):
                    break
                data, content_type = pieces(value, n)
                self.sock.send(encode(BatchChunk(batch_id, data, content_type)))
        except Exception as exc:  # noqa: BLE001 - user code
            logger.error("the handler's stream raised:\n%s", traceback.format_exc())
            self.sock.send(encode(BatchFailed(batch_id, f"{type(exc).__name__}: {exc}")))
            return
        self.sock.send(encode(BatchEnd(batch_id)))


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
