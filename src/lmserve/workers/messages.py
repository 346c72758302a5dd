"""The typed messages between the frontend and an engine process, and their wire format.

Every message is a frozen dataclass with a fixed tag. On the wire a message is one msgpack array
``[tag, field, field, ...]``: plain data only, so a peer can never be made to call a method by name
and nothing is unpickled. ``encode``/``decode`` are the only functions that touch bytes.

Frontend -> engine: ``AddRequest``, ``Abort``, ``StatsQuery``, ``Shutdown``.
Engine -> frontend: ``Ready`` (once, after the model loaded), ``Deltas`` (one per engine step that
produced output), ``RequestFailed`` (``add_request`` refused one request), ``Stats`` (answer to a
``StatsQuery``), ``EngineFailed`` (the engine cannot go on; the process exits after sending it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from lmserve import errors
from lmserve.config.settings import EngineConfig
from lmserve.engine.outputs import RequestDelta, TokenLogprob
from lmserve.engine.protocol import EngineStats, ModelInfo
from lmserve.engine.sampling_params import SamplingParams

# Errors that may cross the process boundary with their type kept; anything else arrives as "internal".
_ERROR_TYPES: dict[str, type[errors.LMServeError]] = {
    cls.__name__: cls
    for cls in (errors.InvalidRequestError, errors.CapacityError, errors.OutOfMemoryError,
                errors.UnsupportedModelError, errors.ConfigError, errors.ModelNotFoundError,
                errors.HandlerError, errors.NotAllowedError)
}  # fmt: skip


@dataclass(frozen=True)
class ErrorInfo:
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
    ``EngineConfig`` and ``options`` as keyword arguments."""

    factory: str
    config: EngineConfig
    options: dict[str, Any] = field(default_factory=dict)


# ---- frontend -> engine --------------------------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    TAG: ClassVar[int] = 1
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Abort:
    TAG: ClassVar[int] = 2
    request_ids: list[str]


@dataclass(frozen=True)
class StatsQuery:
    TAG: ClassVar[int] = 3
    query_id: int


@dataclass(frozen=True)
class Shutdown:
    TAG: ClassVar[int] = 4


# ---- engine -> frontend --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    TAG: ClassVar[int] = 10
    model_info: ModelInfo
    pid: int


@dataclass(frozen=True)
class Deltas:
    """All output of one engine step. ``queue_time_s`` holds, for requests whose first output is in
    this step, the seconds from ``add_request`` to the start of that step."""

    TAG: ClassVar[int] = 11
    deltas: list[RequestDelta]
    queue_time_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestFailed:
    TAG: ClassVar[int] = 12
    request_id: str
    error: ErrorInfo


@dataclass(frozen=True)
class Stats:
    TAG: ClassVar[int] = 13
    query_id: int
    stats: EngineStats


@dataclass(frozen=True)
class EngineFailed:
    TAG: ClassVar[int] = 14
    error: ErrorInfo


Message = AddRequest | Abort | StatsQuery | Shutdown | Ready | Deltas | RequestFailed | Stats | EngineFailed


# ---- wire format ---------------------------------------------------------------------------------


def _delta_to_wire(d: RequestDelta) -> list[Any]:
    logprobs = None if d.logprobs is None else [[lp.token_id, lp.logprob, [list(t) for t in lp.top]]
                                                  for lp in d.logprobs]  # fmt: skip
    return [d.request_id, d.token_ids, d.text, logprobs, d.finish_reason, d.stop_reason,
            d.num_prompt_tokens, d.num_generated_tokens, d.num_cached_tokens, d.error]  # fmt: skip


def _delta_from_wire(w: list[Any]) -> RequestDelta:
    logprobs = None if w[3] is None else [TokenLogprob(t, lp, tuple((i, v) for i, v in top))
                                          for t, lp, top in w[3]]  # fmt: skip
    return RequestDelta(w[0], list(w[1]), w[2], logprobs, w[4], w[5], w[6], w[7], w[8], w[9])


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _to_wire(msg: Message) -> list[Any]:
    match msg:
        case AddRequest():
            return [msg.request_id, msg.prompt_token_ids, _fields(msg.params)]
        case Abort():
            return [msg.request_ids]
        case StatsQuery() | Stats():
            return [msg.query_id, _fields(msg.stats)] if isinstance(msg, Stats) else [msg.query_id]
        case Shutdown():
            return []
        case Ready():
            return [_fields(msg.model_info), msg.pid]
        case Deltas():
            return [[_delta_to_wire(d) for d in msg.deltas], msg.queue_time_s]
        case RequestFailed():
            return [msg.request_id, _fields(msg.error)]
        case EngineFailed():
            return [_fields(msg.error)]
    raise TypeError(f"not a message: {msg!r}")


def _model_info(data: dict[str, Any]) -> ModelInfo:
    return ModelInfo(**{**data, "eos_token_ids": tuple(data["eos_token_ids"])})


_DECODERS: dict[int, Any] = {
    AddRequest.TAG: lambda w: AddRequest(w[0], list(w[1]), SamplingParams(**w[2])),
    Abort.TAG: lambda w: Abort(list(w[0])),
    StatsQuery.TAG: lambda w: StatsQuery(w[0]),
    Shutdown.TAG: lambda w: Shutdown(),
    Ready.TAG: lambda w: Ready(_model_info(w[0]), w[1]),
    Deltas.TAG: lambda w: Deltas([_delta_from_wire(d) for d in w[0]], dict(w[1])),
    RequestFailed.TAG: lambda w: RequestFailed(w[0], ErrorInfo(**w[1])),
    Stats.TAG: lambda w: Stats(w[0], EngineStats(**w[1])),
    EngineFailed.TAG: lambda w: EngineFailed(ErrorInfo(**w[0])),
}


def encode(msg: Message) -> bytes:
    """One message as bytes."""
    return msgpack.packb([msg.TAG, *_to_wire(msg)], use_bin_type=True)


def decode(data: bytes) -> Message:
    """Bytes back into a message. Raises ``ValueError`` for anything that is not one."""
    try:
        tag, *wire = msgpack.unpackb(data, raw=False, strict_map_key=False)
        return _DECODERS[tag](wire)  # type: ignore[no-any-return]
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"not an engine message: {exc}") from exc


def encode_spec(spec: EngineSpec) -> bytes:
    """The engine spec handed to a new engine process."""
    return msgpack.packb([spec.factory, _fields(spec.config), spec.options], use_bin_type=True)


def decode_spec(data: bytes) -> EngineSpec:
    factory, config, options = msgpack.unpackb(data, raw=False)
    return EngineSpec(factory, EngineConfig(**config), dict(options))
