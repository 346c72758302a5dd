"""Input and Output as handler scripts use them, and how an answer is split over a batch."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from lmserve.handlers.answers import HandlerContractError, answers, pieces
from lmserve.handlers.io import Input, Output


def request(body: bytes, content_type: str | None = "application/json", **props: str) -> Input:
    properties = ({"Content-Type": content_type} if content_type else {}) | props
    return Input(properties, {"data": body})


def test_the_djl_import_path_gives_the_same_classes() -> None:
    from djl_python import Input as DjlInput
    from djl_python import Output as DjlOutput
    from djl_python.inputs import Input as ModuleInput
    from djl_python.outputs import Output as ModuleOutput

    assert DjlInput is ModuleInput is Input and DjlOutput is ModuleOutput is Output


def test_initialisation_input_is_empty_and_carries_properties() -> None:
    init = Input({"model_dir": "/m", "batch_size": "4"})
    assert init.is_empty() and init.get_property("model_dir") == "/m" and init.get_properties()["batch_size"] == "4"
    assert not request(b"{}").is_empty()


def test_get_data_follows_the_content_type() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    buffer = io.BytesIO()
    np.save(buffer, array)
    assert request(b'{"a": 1}').get_data() == {"a": 1}
    assert request(b"hello", "text/plain; charset=utf-8").get_data() == "hello"
    assert (request(buffer.getvalue(), "application/x-npy").get_data() == array).all()
    assert request(b"\x00\x01", "application/octet-stream").get_data() == b"\x00\x01"
    assert request(b"[1, 2]", None).get_data() == [1, 2]  # undeclared JSON still decodes
    assert request(b"x", "text/plain", **{"X-Custom": "v"}).get_property("x-custom") == "v"


def test_a_batch_lists_its_requests_in_order() -> None:
    batch = Input(batch=[request(b'{"n": 0}', request_id="a"), request(b'{"n": 1}', request_id="b")])
    assert batch.is_batch() and batch.get_batch_size() == 2 and not batch.is_empty()
    assert [item.get_as_json()["n"] for item in batch.get_batches()] == [0, 1]
    assert [item.get_request_id() for item in batch.get_batches()] == ["a", "b"]
    assert batch.get_as_json() == {"n": 0} and batch.contains_key("batch_001_data")
    single = request(b"{}")
    assert not single.is_batch() and single.get_batches() == [single]


def test_outputs_added_by_batch_index_answer_their_own_request() -> None:
    out = Output()
    out.add_as_json({"n": 1}, batch_index=1).add_as_json({"n": 0}, batch_index=0)
    out.add_property("x-shared", "yes")
    first, second = answers(out, 2)
    assert json.loads(first.body) == {"n": 0} and json.loads(second.body) == {"n": 1}
    assert first.properties["content-type"] == "application/json" and second.properties["x-shared"] == "yes"


def test_lists_plain_values_and_errors() -> None:
    plain = answers([{"a": 1}, "text"], 2)
    assert json.loads(plain[0].body) == {"a": 1} and plain[1].body == b"text"
    listed = answers([Output().add("x"), Output(code=201).add_as_json([1])], 2)
    assert listed[0].body == b"x" and listed[1].code == 201 and json.loads(listed[1].body) == [1]
    assert json.loads(answers({"a": 1}, 1)[0].body) == {"a": 1}
    failed = answers(Output().error("bad input", 422), 3)
    assert [a.code for a in failed] == [422] * 3 and json.loads(failed[0].body)["error"] == "bad input"


@pytest.mark.parametrize(("result", "size", "why"), [
    (Output().add_as_json(1), 2, "without batch_index"),
    ([Output(), Output()], 3, "returned 2 output(s) for a batch of 3"),
    (Output().add_as_json(1, batch_index=0), 2, "no output for request(s) [1]"),
    (None, 1, "returned None"),
    ({"a": 1}, 2, "one dict for a batch of 2"),
])  # fmt: skip
def test_an_answer_that_does_not_fit_the_batch_says_why(result: object, size: int, why: str) -> None:
    with pytest.raises(HandlerContractError, match=why.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        answers(result, size)


def test_stream_pieces_are_json_lines_or_text() -> None:
    assert pieces({"token": "a"}, 1) == ([b'{"token": "a"}\n'], "application/jsonlines")
    assert pieces("abc", 1)[0] == [b"abc"]
    assert pieces(["a", None], 2)[0] == [b"a", None]
    with pytest.raises(HandlerContractError, match="list of 2"):
        pieces("a", 2)


def test_add_as_json_takes_numpy_and_writes_float32_values_that_read_back_exactly() -> None:
    vectors = np.random.default_rng(0).standard_normal((3, 384)).astype(np.float32)
    out = Output().add_as_json({"vectors": vectors, "count": np.int64(3), 7: "int key"})
    body = json.loads(out.content["data"])
    assert body["count"] == 3 and body["7"] == "int key"
    assert (np.array(body["vectors"], dtype=np.float32) == vectors).all()  # the same float32 values
    # each value in its shortest float32 text, not its float64 widening
    assert len(out.content["data"]) < len(json.dumps(vectors.tolist()).encode()) * 0.7
    assert json.loads(Output().add_as_json(2**70).content["data"]) == 2**70  # past orjson's integers
