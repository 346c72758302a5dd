"""Typed messages between the frontend and a handler worker process (msgpack, through msgspec, over a ZMQ PAIR socket).

Frontend -> worker: ``RunBatch`` (one batch of requests), ``Stop``.
Worker -> frontend: ``WorkerReady`` (the handler initialised), ``WorkerLoadFailed``, and for each
batch either ``BatchDone`` (one ``ItemOutput`` per request), ``BatchFailed`` (the handler raised or
broke the contract; every request of the batch fails), or ``BatchChunk`` messages (a streaming
handler: one optional piece per request) closed by ``BatchEnd``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec


@dataclass(frozen=True)
class HandlerSpec:
    """What a worker process loads: ``entry`` is a ``.py`` file (absolute) or ``module:function``."""

    entry: str
    model_dir: str
    properties: dict[str, str] = field(default_factory=dict)
    site_dirs: tuple[str, ...] = ()  # put first on sys.path (installed requirements, a model venv)


@dataclass(frozen=True)
class Item:
    """One request: its properties (HTTP headers, request id) and content (``data`` is the body)."""

    properties: dict[str, str]
    content: dict[str, bytes]


@dataclass(frozen=True)
class ItemOutput:
    """One request's answer."""

    code: int
    message: str
    properties: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class RunBatch:
    batch_id: int
    items: list[Item]


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class WorkerReady:
    pid: int


@dataclass(frozen=True)
class WorkerLoadFailed:
    error: str


@dataclass(frozen=True)
class BatchDone:
    batch_id: int
    outputs: list[ItemOutput]


@dataclass(frozen=True)
class BatchFailed:
    batch_id: int
    error: str
    code: int = 424


@dataclass(frozen=True)
class BatchChunk:
    """One step of a stream: ``pieces[i]`` for request ``i`` (None: nothing this step)."""

    batch_id: int
    pieces: list[bytes | None]
    content_type: str


@dataclass(frozen=True)
class BatchEnd:
    batch_id: int


Message = RunBatch | Stop | WorkerReady | WorkerLoadFailed | BatchDone | BatchFailed | BatchChunk | BatchEnd
_KINDS: dict[str, type[Any]] = {cls.__name__: cls for cls in (RunBatch, Stop, WorkerReady, WorkerLoadFailed,
                                                             BatchDone, BatchFailed, BatchChunk, BatchEnd)}  # fmt: skip


def encode(message: Message) -> bytes:
    """``[kind, fields]``: msgspec encodes the dataclasses itself (a batch of 32 requests in a few
    microseconds; through ``dataclasses.asdict`` it took a quarter of a millisecond)."""
    return msgspec.msgpack.encode((type(message).__name__, message))


def decode(data: bytes) -> Message:
    """The message in ``data``, its fields type-checked; ``ValueError`` for anything malformed."""
    try:
        kind, fields = msgspec.msgpack.decode(data)
        return msgspec.convert(fields, type=_KINDS[kind])  # type: ignore[no-any-return]
    except (KeyError, TypeError, AttributeError, msgspec.DecodeError, ValueError) as exc:
        raise ValueError(f"malformed handler message: {exc}") from exc
