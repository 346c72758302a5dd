"""The engine process: builds one engine and serves it over two ZMQ sockets until told to stop.

Loop, in order: take every waiting message (blocking with a timeout only while the engine is idle
and has no idle-time work left: ``warm_idle``, a few milliseconds a call), apply them, run one
``step()``, and send all of its output as one ``Deltas`` message. Anything the
engine raises from ``step()`` is fatal: the process reports ``EngineFailed`` and exits non-zero, and
the frontend fails the requests in flight. ``add_request`` errors fail only that request. A
``Heartbeat`` thread tells the frontend the process is alive, however long a step takes. On the CPU
the process's OpenMP threads sleep at barriers, and after each step a ``CpuThreadGovernor`` may
change how many the kernels use (``engine/cpu_threads.py``: other processes taking the cores).

This module is the only place the engine is imported, so torch loads in this process, never in the
frontend.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from lmserve.engine.cpu_threads import CpuThreadGovernor, cpu_thread_governor, quiet_thread_waits
from lmserve.engine.protocol import EngineCore
from lmserve.gc_freeze import freeze_startup_objects
from lmserve.workers.messages import (
    Abort,
    AddRequest,
    Deltas,
    EngineFailed,
    ErrorInfo,
    Heartbeat,
    Message,
    Ready,
    RequestFailed,
    Shutdown,
    Stats,
    StatsQuery,
    decode,
    decode_spec,
    encode,
)

logger = logging.getLogger("lmserve.engine_process")
_IDLE_POLL_MS = 500  # how long an idle engine blocks before looking at its parent again
_PARENT_CHECK_S = 1.0  # an orphaned engine (frontend killed) stops within about this long


def load_factory(path: str) -> Callable[..., EngineCore]:
    """The callable named by ``"package.module:attribute"``."""
    module_name, _, attribute = path.partition(":")
    if not attribute:
        raise ValueError(f"engine factory must look like 'package.module:attribute', got {path!r}")
    return getattr(importlib.import_module(module_name), attribute)  # type: ignore[no-any-return]


def run_engine_process(spec_bytes: bytes, input_address: str, output_address: str,
                       env: dict[str, str] | None = None, cpus: list[int] | None = None,
                       heartbeat_s: float | None = None) -> None:
    """Entry point of the spawned process. Exits 0 after ``Shutdown``, 1 after a failure. ``env``
    (e.g. ``CUDA_VISIBLE_DEVICES``) is set and the process pinned to ``cpus`` before the engine is
    built, so the engine, its threads and its tensor-parallel ranks all inherit them. With
    ``heartbeat_s`` a ``Heartbeat`` goes out that often once the engine has loaded."""
    # Ctrl+C, and SIGTERM from supervisors that signal a whole process group or cgroup, must not
    # stop the engine while the frontend drains: the frontend decides when this process stops, and
    # an engine whose frontend is gone stops by itself (see ``EngineLoop._orphaned``).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _take_placement(env or {}, cpus)
    quiet_thread_waits(os.environ)  # before the engine imports torch, which starts OpenMP
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(input_address)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)  # never drop or block on output; the frontend drains it
    outbox.connect(output_address)
    code = 1
    heartbeat = HeartbeatThread(ctx, output_address, heartbeat_s) if heartbeat_s else None
    engine = None
    try:
        engine = _build_engine(spec_bytes, outbox)
        if engine is not None:
            if heartbeat is not None:
                heartbeat.start()
            freeze_startup_objects(collect=True)  # no full collection of the engine's objects mid-step
            outbox.send(encode(Ready(engine.model_info, os.getpid())))
            code = 0 if EngineLoop(engine, inbox, outbox, _thread_governor(spec_bytes, engine)).run() else 1
    finally:
        _stop_engine(engine)
        if heartbeat is not None:
            heartbeat.stop()  # before ctx.term(), which waits for every socket to close
        outbox.close(linger=2000)  # let the last message (Deltas, EngineFailed) reach the frontend
        inbox.close(linger=0)
        ctx.term()
    sys.exit(code)


def _stop_engine(engine: EngineCore | None) -> None:
    """Let the engine stop what it started (``shutdown`` is optional, as ``LLMEngine``'s is): at exit a
    spawned process joins its children, and tensor-parallel ranks, which ignore SIGTERM as this
    process does, would keep it waiting until the frontend kills it."""
    stop = getattr(engine, "shutdown", None)
    if stop is None:
        return
    try:
        stop()
    except Exception:  # noqa: BLE001 - the process exits either way; say why its children may linger
        logger.exception("the engine did not shut down cleanly")


def _take_placement(env: dict[str, str], cpus: list[int] | None) -> None:
    os.environ.update(env)
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:  # e.g. a container that forbids it: run unpinned rather than not at all
        logger.warning("could not pin the engine to cores %s: %s", cpus, exc)


def _build_engine(spec_bytes: bytes, outbox: zmq.Socket[Any]) -> EngineCore | None:
    try:
        spec = decode_spec(spec_bytes)
        started = time.perf_counter()
        engine = load_factory(spec.factory)(spec.config, **spec.options)
        logger.info("engine loaded in %.2fs (%s)", time.perf_counter() - started, spec.factory)
        return engine
    except BaseException as exc:  # report every load failure, then exit
        logger.exception("engine failed to load")
        outbox.send(encode(EngineFailed(ErrorInfo.of(exc))))
        return None


def _thread_governor(spec_bytes: bytes, engine: EngineCore) -> CpuThreadGovernor | None:
    """Adaptive kernel threads (``option.adaptive_threads``) for an engine that computes with torch
    on the CPU as one process: the ranks of a tensor-parallel group would count each other as the
    other processes. Decided here, not in the engine, because the thread count is process-wide:
    the offline ``LLM`` never changes the count of the process that embeds it."""
    info = engine.model_info
    if "torch" not in sys.modules or info.device != "cpu" or info.tensor_parallel_degree != 1:
        return None
    if not decode_spec(spec_bytes).config.adaptive_threads:
        return None
    import torch  # noqa: PLC0415 - already imported by the engine (checked above)

    return cpu_thread_governor(torch.get_num_threads())


class HeartbeatThread:
    """Sends ``Heartbeat`` every ``interval_s`` seconds from a thread and a socket of its own (ZMQ
    sockets must not be shared between threads).

    Why a thread, and not a beat between steps: the frontend must tell a frozen process (SIGSTOP, a
    host that stalls it) from a busy one, and one step may rightly take long (a long prefill on the
    CPU), with no useful bound on how long. The thread keeps beating while the main thread is inside
    a step (torch releases the GIL in its kernels, and Python hands the GIL over every few
    milliseconds anyway), and it stops with the whole process when the process is frozen. So the
    deadline depends only on scheduling, never on step time. A step that never returns in a live
    process is not this check's business: ``predict_timeout`` ends its requests.
    """

    def __init__(self, ctx: zmq.Context[Any], address: str, interval_s: float) -> None:
        self.ctx, self.address, self.interval_s = ctx, address, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmserve-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        socket = self.ctx.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, 2)  # beats a stalled frontend has not read are worth nothing: drop them
        socket.connect(self.address)
        beat = encode(Heartbeat())
        try:
            while True:
                with contextlib.suppress(zmq.Again):
                    socket.send(beat, zmq.NOBLOCK)
                if self._stop.wait(self.interval_s):
                    return
        finally:
            socket.close(linger=0)


class EngineLoop:
    """Drives one ``EngineCore`` from the messages on ``inbox``; see the module docstring."""

    def __init__(self, engine: EngineCore, inbox: zmq.Socket[Any], outbox: zmq.Socket[Any],
                 threads: CpuThreadGovernor | None = None) -> None:
        self.engine, self.inbox, self.outbox, self.threads = engine, inbox, outbox, threads
        self._parent = os.getppid()
        self._parent_checked = time.monotonic()
        self._added_at: dict[str, float] = {}  # request id -> when it was added, until its first output

    def run(self) -> bool:
        """Serve until ``Shutdown`` (returns True) or a fatal engine error (returns False)."""
        warm = getattr(self.engine, "warm_idle", None)  # optional idle-time work (LLMEngine's)
        while True:
            busy = self.engine.has_unfinished_requests()
            more_idle_work = not busy and warm is not None and warm()
            for message in self._receive(block=not busy and not more_idle_work):
                if isinstance(message, Shutdown):
                    return True
                self._apply(message)
            if self._orphaned():
                logger.error("the frontend process is gone; stopping")
                return True
            if self.engine.has_unfinished_requests() and not self._step():
                return False

    def _orphaned(self) -> bool:
        now = time.monotonic()
        if now - self._parent_checked < _PARENT_CHECK_S:
            return False
        self._parent_checked = now
        return os.getppid() != self._parent

    def _receive(self, block: bool) -> list[Message]:
        if block and not self.inbox.poll(_IDLE_POLL_MS):
            return []
        messages: list[Message] = []
        while True:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            try:
                messages.append(decode(data))
            except ValueError:
                logger.exception("dropping a malformed message")

    def _apply(self, message: Message) -> None:
        match message:
            case AddRequest(request_id=rid, prompt_token_ids=prompt, params=params):
                try:
                    self.engine.add_request(rid, prompt, params)
                    self._added_at[rid] = time.monotonic()
                except Exception as exc:  # refuse this request only; the engine is still sound
                    self._send(RequestFailed(rid, ErrorInfo.of(exc)))
            case Abort(request_ids=ids):
                for rid in ids:
                    self.engine.abort_request(rid)
                    self._added_at.pop(rid, None)
            case StatsQuery(query_id=qid):
                self._send(Stats(qid, self.engine.stats()))
            case _:
                logger.error("unexpected message in the engine: %r", message)

    def _step(self) -> bool:
        started = time.monotonic()
        try:
            deltas = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed")
            self._send(EngineFailed(ErrorInfo.of(exc)))
            return False
        if self.threads is not None:
            self.threads.after_step()
        if deltas:
            queue_time = {}
            for delta in deltas:
                added = self._added_at.pop(delta.request_id, None)
                if added is not None:
                    queue_time[delta.request_id] = max(0.0, started - added)
            self._send(Deltas(deltas, queue_time))
        return True

    def _send(self, message: Message) -> None:
        self.outbox.send(encode(message))
