"""Every engine message survives the trip through bytes with its types intact."""

from __future__ import annotations

import pytest

from lmserve.config.settings import EngineConfig
from lmserve.engine.outputs import RequestDelta, TokenLogprob
from lmserve.engine.protocol import EngineStats, ModelInfo
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import CapacityError, InvalidRequestError
from lmserve.workers import messages as m

INFO = ModelInfo("tiny", 64, 57, "fp32", "cpu", 1, (2, 7), 8, 256, 1024)
DELTA = RequestDelta("r1", [5, 6], "w2 w3", [TokenLogprob(5, -0.5, ((5, -0.5), (9, -1.5))),
                                             TokenLogprob(6, -0.25)], "stop", "w3", 4, 2, 1, None)  # fmt: skip


@pytest.mark.parametrize("message", [
    m.AddRequest("r1", [1, 2, 3], SamplingParams(max_new_tokens=7, temperature=0.5, stop=("a", "b"), seed=3)),
    m.AddRequest("r2", [1], SamplingParams(presence_penalty=0.5, frequency_penalty=-1, logit_bias={3: 1.5, 7: -100})),
    m.Abort(["r1", "r2"]),
    m.StatsQuery(4),
    m.Shutdown(),
    m.Ready(INFO, 1234),
    m.Deltas([DELTA, RequestDelta("r2", [], "", finish_reason="abort")], {"r1": 0.25}),
    m.RequestFailed("r1", m.ErrorInfo("InvalidRequestError", "too long", "inputs")),
    m.Stats(4, EngineStats(num_running=2, kv_blocks_total=10, kv_blocks_free=3)),
    m.EngineFailed(m.ErrorInfo("internal", "boom")),
    m.Deltas([RequestDelta("r3", [], "", finish_reason="error", error="no memory", error_kind="out_of_memory")]),
    m.Heartbeat(),
])  # fmt: skip
def test_message_round_trip(message: m.Message) -> None:
    assert m.decode(m.encode(message)) == message


def test_spec_round_trip() -> None:
    spec = m.EngineSpec("pkg.mod:Engine", EngineConfig(model="/models/x", max_model_len=99), {"delay": 0.5})
    assert m.decode_spec(m.encode_spec(spec)) == spec


def test_an_unknown_message_or_a_mistyped_field_fails_loudly_naming_it() -> None:
    import msgspec

    with pytest.raises(ValueError, match="Invalid value 'Reboot'"):
        m.decode(msgspec.msgpack.encode({"type": "Reboot"}))
    with pytest.raises(ValueError, match=r"Expected `int`, got `str` - at `\$.query_id`"):
        m.decode(msgspec.msgpack.encode({"type": "StatsQuery", "query_id": "4"}))
    with pytest.raises(ValueError, match="missing required field `request_ids`"):
        m.decode(msgspec.msgpack.encode({"type": "Abort"}))
    with pytest.raises(ValueError, match=r"Invalid enum value 'oom' - at `\$.deltas\[0\].error_kind`"):
        m.decode(msgspec.msgpack.encode({"type": "Deltas", "deltas": [
            {"request_id": "r", "token_ids": [], "text": "", "error_kind": "oom"}]}))  # fmt: skip


def test_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        m.decode(b"\x93\x63\x01\x02")
    with pytest.raises(ValueError):
        m.decode(b"not msgpack at all \xc1")


def test_errors_keep_their_type_and_field() -> None:
    info = m.ErrorInfo.of(InvalidRequestError("parameters.top_p", "must be <= 1"))
    exc = m.decode(m.encode(m.RequestFailed("r", info))).error.to_exception()  # type: ignore[union-attr]
    assert isinstance(exc, InvalidRequestError) and exc.field == "parameters.top_p"
    assert isinstance(m.ErrorInfo.of(CapacityError("full")).to_exception(), CapacityError)
    internal = m.ErrorInfo.of(ZeroDivisionError("x"))
    assert internal.kind == "internal" and isinstance(internal.to_exception(), RuntimeError)
