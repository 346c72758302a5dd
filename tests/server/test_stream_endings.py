"""How a stream ends when its engine dies or the server shuts down under it: every dialect says what
happened in its error event (not "overloaded") and ends as its clients expect (OpenAI: ``[DONE]``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmserve.workers.launcher import Backoff
from tests.server.conftest import LiveServer, start_server

LONG = 60
DIALECTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lmi": ("/invocations", {"inputs": "hello", "stream": True, "parameters": {"max_new_tokens": LONG}}),
    "tgi": ("/generate_stream", {"inputs": "hello", "parameters": {"max_new_tokens": LONG}}),
    "openai": ("/v1/completions", {"prompt": "hello", "max_tokens": LONG, "stream": True}),
    # The chat template adds a few prompt tokens: the limit must still fit the test model's 64.
    "openai-chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                             "max_tokens": LONG - 10, "stream": True}),
}  # fmt: skip


@pytest.fixture
def server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = start_server(tiny_model_dir, {"token_delay_s": 0.05}, backoff=Backoff(first_s=0.2))
    yield live
    live.stop()


def streams_in_flight(http: httpx.Client, stack: ExitStack) -> dict[str, Iterator[str]]:
    """One long stream per dialect, each read up to its first event."""
    lines = {}
    for dialect, (path, body) in DIALECTS.items():
        response = stack.enter_context(http.stream("POST", path, json=body))
        assert response.status_code == 200, dialect
        lines[dialect] = (line for line in response.iter_lines() if line)
        next(lines[dialect])
    return lines


def ending(dialect: str, lines: list[str]) -> dict[str, Any]:
    """The error body a stream ended with, after checking the dialect's own way of ending."""
    if dialect == "lmi":
        return json.loads(lines[-1])  # type: ignore[no-any-return]
    if dialect == "tgi":
        assert lines[-2] == "event: error"
        return json.loads(lines[-1][len("data:"):])  # type: ignore[no-any-return]
    assert lines[-3:-1][0] == "event: error" and lines[-1] == "data: [DONE]", lines[-3:]
    return json.loads(lines[-2][len("data:"):])  # type: ignore[no-any-return]


def test_engine_crash_ends_every_stream_with_an_engine_failure_and_its_terminator(server: LiveServer) -> None:
    with server.client() as http, ExitStack() as stack:
        lines = streams_in_flight(http, stack)
        os.kill(server.runtime.router.replicas[0].pid, signal.SIGKILL)  # type: ignore[union-attr, arg-type]
        for dialect, rest in lines.items():
            error = ending(dialect, list(rest))
            assert error["code"] == 503 and error["error_type"] == "engine_failure", dialect
            assert "engine process exited" in error["error"], dialect


def test_shutdown_abort_ends_every_stream_with_shutting_down_and_its_terminator(server: LiveServer) -> None:
    loop = server.server.servers[0].get_loop()
    with server.client() as http, ExitStack() as stack:
        lines = streams_in_flight(http, stack)
        asyncio.run_coroutine_threadsafe(server.registry.drain(0.0), loop).result(10)
        for dialect, rest in lines.items():
            error = ending(dialect, list(rest))
            assert error["code"] == 503 and error["error_type"] == "shutting_down", dialect
            assert "shut down before the request finished" in error["error"], dialect
        refused = http.post("/generate", json={"inputs": "hello"})
        assert refused.status_code == 503 and refused.json()["error_type"] == "shutting_down"


def test_out_of_memory_in_the_middle_of_a_request_is_507_whole_or_streamed(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {"oom_on_word": "w7", "oom_after": 2})
    try:
        with server.client() as http:
            whole = http.post("/generate", json={"inputs": "w7", "parameters": {"max_new_tokens": 10}})
            assert whole.status_code == 507 and "out of memory" in whole.json()["error"]
            body = {"prompt": "w7", "max_tokens": 10, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200  # two tokens came first
                error = ending("openai", [line for line in r.iter_lines() if line])
            assert error["code"] == 507 and "out of memory" in error["error"]
            assert http.post("/generate", json={"inputs": "w8"}).status_code == 200  # the engine lives on
    finally:
        server.stop()
