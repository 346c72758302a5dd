"""The typed messages between the frontend and an engine process, and their wire format.

Every message is a frozen ``msgspec`` struct, tagged with its class name; the types are the wire
format. On the wire a message is one msgpack map (``{"type": "AddRequest", "request_id": ...}``),
plain data only, so a peer can never be made to call a method by name and nothing is unpickled.
Adding a field is one edit here (or in the dataclass it carries); bytes that are not a message of
this module, or a message whose fields do not match its type, fail to decode with a ``ValueError``
that says where. ``encode``/``decode`` are the only functions that touch bytes.

Frontend -> engine: ``AddRequest``, ``Abort``, ``StatsQuery``, ``Shutdown``.
Engine -> frontend: ``Ready`` (once, after the model loaded), ``Deltas`` (one per engine step that
produced output), ``RequestFailed`` (``add_request`` refused one request), ``Stats`` (answer to a
``StatsQuery``), ``EngineFailed`` (the engine cannot go on; the process exits after sending it),
``Heartbeat`` (every so often from a thread of its own: the process is alive, see
``engine_process.HeartbeatThread``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from lmserve import errors
from lmserve.config.settings import EngineConfig
from lmserve.engine.outputs import RequestDelta
from lmserve.engine.protocol import EngineStats, ModelInfo
from lmserve.engine.sampling_params import SamplingParams

# Errors that may cross the process boundary with their type kept; anything else arrives as "internal".
_ERROR_TYPES: dict[str, type[errors.LMServeError]] = {
    cls.__name__: cls
    for cls in (errors.InvalidRequestError, errors.CapacityError, errors.OutOfMemoryError,
                errors.UnsupportedModelError, errors.ConfigError, errors.ModelNotFoundError,
                errors.HandlerError, errors.NotAllowedError)
}  # fmt: skip


class ErrorInfo(msgspec.Struct, frozen=True):
    """An exception reduced to data: its kind (an ``lmserve.errors`` class name or ``"internal"``), its
    message, and the offending field for ``InvalidRequestError``."""

    kind: str
    message: str
    field: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        kind = type(exc).__name__ if type(exc).__name__ in _ERROR_TYPES else "internal"
        if isinstance(exc, errors.InvalidRequestError):
            return cls(kind, exc.message, exc.field)
        return cls(kind, str(exc) or type(exc).__name__)

    def to_exception(self) -> Exception:
        """The typed exception this describes; ``RuntimeError`` for internal failures."""
        cls = _ERROR_TYPES.get(self.kind)
        if cls is errors.InvalidRequestError:
            return errors.InvalidRequestError(self.field or "inputs", self.message)
        if cls is None or cls is errors.ConfigError:
            return RuntimeError(self.message)
        return cls(self.message)


@dataclass(frozen=True)
class EngineSpec:
    """How an engine process builds its engine: ``factory`` ("module:attribute") called with the
    ``EngineConfig`` and ``options`` as keyword arguments. Not a message: the argument a new engine
    process is spawned with (a dataclass, so callers ``dataclasses.replace`` it)."""

    factory: str
    config: EngineConfig
    options: dict[str, Any] = field(default_factory=dict)


class _Message(msgspec.Struct, frozen=True, tag=True):
    """Base of every message: frozen, and tagged with its class name on the wire."""


# ---- frontend -> engine --------------------------------------------------------------------------


class AddRequest(_Message, frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class Abort(_Message, frozen=True):
    request_ids: list[str]


class StatsQuery(_Message, frozen=True):
    query_id: int


class Shutdown(_Message, frozen=True):
    pass


# ---- engine -> frontend --------------------------------------------------------------------------


class Ready(_Message, frozen=True):
    model_info: ModelInfo
    pid: int


class Deltas(_Message, frozen=True):
    """All output of one engine step. ``queue_time_s`` holds, for requests whose first output is in
    this step, the seconds from ``add_request`` to the start of that step."""

    deltas: list[RequestDelta]
    queue_time_s: dict[str, float] = msgspec.field(default_factory=dict)


class RequestFailed(_Message, frozen=True):
    request_id: str
    error: ErrorInfo


class Stats(_Message, frozen=True):
    query_id: int
    stats: EngineStats


class EngineFailed(_Message, frozen=True):
    error: ErrorInfo


class Heartbeat(_Message, frozen=True):
    pass


Message = AddRequest | Abort | StatsQuery | Shutdown | Ready | Deltas | RequestFailed | Stats | EngineFailed | Heartbeat


# ---- wire format ---------------------------------------------------------------------------------

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)
_SPEC_DECODER = msgspec.msgpack.Decoder(EngineSpec)


def encode(msg: Message) -> bytes:
    """One message as bytes."""
    return _ENCODER.encode(msg)


def decode(data: bytes) -> Message:
    """Bytes back into a message. Raises ``ValueError`` saying what is wrong for anything that is
    not one (unknown type, missing or mistyped field, not msgpack at all)."""
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ValueError(f"not an engine message: {exc}") from exc


def encode_spec(spec: EngineSpec) -> bytes:
    """The engine spec handed to a new engine process."""
    return _ENCODER.encode(spec)


def decode_spec(data: bytes) -> EngineSpec:
    try:
        return _SPEC_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not an engine spec: {exc}") from exc
