"""option.output_formatter for the default text-generation handler on /invocations: each gives its
documented shape, streaming and not (the fake engine stands in for a model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.handlers.conftest import start_handler_server
from tests.server.conftest import FAKE_FACTORY, LiveServer

ASK = {"inputs": "hello there", "parameters": {"max_new_tokens": 5}}


@pytest.fixture(scope="module", params=[None, "json", "jsonlines", "sse"])
def live(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[tuple[str | None, LiveServer]]:
    server = start_handler_server(tiny_model_dir, model={"output_formatter": request.param},
                                  plan={"engine_factory": FAKE_FACTORY, "engine_options": {"token_delay_s": 0.002}})
    yield request.param, server
    server.stop()


def sse_payloads(text: str) -> list[Any]:
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events), text
    return [json.loads(block.removeprefix("data: ")) for block in events]


def test_whole_answers_take_the_formatter_shape(live: tuple[str | None, LiveServer]) -> None:
    formatter, server = live
    with server.client() as http:
        one = http.post("/invocations", json=ASK)
        many = http.post("/invocations", json=ASK | {"inputs": ["a", "b"]})
    assert one.status_code == 200 and many.status_code == 200
    if formatter in (None, "json"):
        assert set(one.json()) == {"generated_text"}
        assert [set(o) for o in many.json()] == [{"generated_text"}] * 2
    elif formatter == "jsonlines":
        assert one.headers["content-type"].startswith("application/jsonlines")
        lines = [json.loads(line) for line in many.text.splitlines()]
        assert [set(line) for line in lines] == [{"generated_text"}] * 2
    else:
        assert one.headers["content-type"].startswith("text/event-stream")
        assert [set(p) for p in sse_payloads(many.text)] == [{"generated_text"}] * 2


def test_streamed_answers_take_the_formatter_shape(live: tuple[str | None, LiveServer]) -> None:
    formatter, server = live
    with server.client() as http:
        whole = http.post("/invocations", json=ASK).json() if formatter is None else None
        streamed = http.post("/invocations", json=ASK | {"stream": True, "parameters": {"max_new_tokens": 5,
                                                                                       "details": True}})
    assert streamed.status_code == 200
    if formatter == "json":  # one JSON document, written piece by piece
        document = json.loads(streamed.text)
        assert set(document) == {"generated_text", "details"} and document["details"]["generated_tokens"] == 5
        return
    events = sse_payloads(streamed.text) if formatter == "sse" else [json.loads(x) for x in streamed.text.splitlines()]
    assert len(events) == 5 and all(event["token"]["text"] is not None for event in events)
    assert events[-1]["generated_text"] == "".join(event["token"]["text"] for event in events)
    assert whole is None or whole["generated_text"] == events[-1]["generated_text"]
