"""The frontend-worker messages survive the trip through msgpack, and a malformed one is a
ValueError that says so rather than a half-built message."""

from __future__ import annotations

import msgspec
import pytest

from lmserve.handlers.messages import (
    BatchChunk,
    BatchDone,
    BatchEnd,
    BatchFailed,
    Item,
    ItemOutput,
    RunBatch,
    Stop,
    WorkerLoadFailed,
    WorkerReady,
    decode,
    encode,
)

MESSAGES = [
    RunBatch(3, [Item({"content-type": "application/json"}, {"data": b'{"inputs": "hi"}'}), Item({}, {})]),
    Stop(),
    WorkerReady(1234),
    WorkerLoadFailed("ImportError: no module named torch"),
    BatchDone(3, [ItemOutput(200, "OK", {"x-prompt-tokens": "4"}, b"[0.5]"), ItemOutput(400, "Bad Request", {}, b"")]),
    BatchFailed(3, "ValueError: boom"),
    BatchChunk(3, [b"tok", None], "text/plain"),
    BatchEnd(3),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_comes_back_equal_with_its_nested_types(message: object) -> None:
    back = decode(encode(message))  # type: ignore[arg-type]
    assert back == message and type(back) is type(message)
    if isinstance(back, RunBatch):
        assert all(isinstance(item, Item) for item in back.items)
    if isinstance(back, BatchDone):
        assert all(isinstance(out, ItemOutput) for out in back.outputs)


@pytest.mark.parametrize("data", [
    b"\xc1 not msgpack",
    msgspec.msgpack.encode(("NoSuchKind", {})),
    msgspec.msgpack.encode(("RunBatch", {"batch_id": 1, "items": "not a list"})),
    msgspec.msgpack.encode(("RunBatch", {"batch_id": 1, "items": [{"properties": {}}]})),  # no content
    msgspec.msgpack.encode(("WorkerReady", {"pid": "1234"})),
    msgspec.msgpack.encode({"kind": "Stop"}),
], ids=["garbage", "unknown-kind", "items-not-a-list", "item-missing-field", "wrong-type", "not-a-pair"])  # fmt: skip
def test_a_malformed_message_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed handler message"):
        decode(data)
