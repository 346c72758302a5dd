"""Back-pressure and abandonment: a full queue, predict_timeout, clients that go away."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import LiveServer, start_server
from tests.server.metrics_util import metric, wait_for_metric

# 20 ms per engine step: a 60-token request takes about 1.2 s, longer than predict_timeout (0.8 s).
LONG = {"inputs": "hello world", "parameters": {"max_new_tokens": 60, "ignore_eos": True}}


@pytest.fixture(scope="module")
def slow(tiny_model_dir: Path) -> Iterator[LiveServer]:
    server = start_server(tiny_model_dir, {"token_delay_s": 0.02}, job_queue_size=3, predict_timeout_s=0.8)
    yield server
    server.stop()


@pytest.fixture
def http(slow: LiveServer) -> Iterator[httpx.Client]:
    with slow.client() as client:
        yield client


def assert_engine_idle(http: httpx.Client) -> None:
    """Nothing runs or waits in the engine and every KV block is free again."""
    wait_for_metric(http, "lmserve_num_requests_running", 0)
    wait_for_metric(http, "lmserve_num_requests_waiting", 0)
    wait_for_metric(http, "lmserve_kv_cache_usage_ratio", 0)


def test_full_queue_answers_429_with_retry_after(slow: LiveServer, http: httpx.Client) -> None:
    with contextlib.ExitStack() as held:
        for _ in range(3):
            client = held.enter_context(slow.client())
            r = held.enter_context(client.stream("POST", "/invocations", json=LONG | {"stream": True}))
            assert r.status_code == 200
        refused = http.post("/invocations", json={"inputs": "hello"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["code"] == 429 and "job_queue_size" in refused.json()["error"]
    assert_engine_idle(http)
    assert http.post("/invocations", json={"inputs": "hello"}).status_code == 200


def test_predict_timeout_is_504_and_stops_the_engine_work(http: httpx.Client) -> None:
    started = time.monotonic()
    r = http.post("/invocations", json=LONG)
    assert r.status_code == 504 and "predict_timeout" in r.json()["error"]
    assert 0.7 < time.monotonic() - started < 1.1
    assert_engine_idle(http)


def test_predict_timeout_during_a_stream_ends_it_with_an_error_line(http: httpx.Client) -> None:
    with http.stream("POST", "/invocations", json=LONG | {"stream": True}) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "token" in lines[0]
    assert lines[-1]["code"] == 504 and "predict_timeout" in lines[-1]["error"]


def test_disconnect_mid_stream_aborts_and_frees_kv_blocks(slow: LiveServer, http: httpx.Client) -> None:
    aborted = metric(http, "lmserve_request_finished_total", finish_reason="abort")
    with slow.client() as client, client.stream("POST", "/generate_stream", json=LONG) as r:
        events = r.iter_lines()
        assert next(events).startswith("data:")
        assert metric(http, "lmserve_kv_cache_usage_ratio") > 0
    assert_engine_idle(http)
    wait_for_metric(http, "lmserve_request_finished_total", aborted + 1, finish_reason="abort")


def test_disconnect_while_waiting_for_a_whole_answer_aborts(slow: LiveServer, http: httpx.Client) -> None:
    aborted = metric(http, "lmserve_request_finished_total", finish_reason="abort")
    with slow.client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 60})
    assert_engine_idle(http)
    wait_for_metric(http, "lmserve_request_finished_total", aborted + 1, finish_reason="abort")


def test_queue_full_status_can_be_503(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {"token_delay_s": 0.02}, job_queue_size=1, queue_full_status=503)
    try:
        with server.client() as client, client.stream("POST", "/generate_stream", json=LONG):
            refused = client.post("/generate", json={"inputs": "hello"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    finally:
        server.stop()


def test_sse_stream_failure_is_an_error_event_clients_raise_on(slow: LiveServer, http: httpx.Client) -> None:
    body = {"prompt": "hello world", "max_tokens": 60, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-3] == "event: error" and lines[-1] == "data: [DONE]"  # the error, then the end of the stream
    assert json.loads(lines[-2][len("data:"):])["code"] == 504

    import openai

    client = openai.OpenAI(base_url=f"{slow.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.completions.create(model="tiny", prompt="hello world", max_tokens=60, stream=True):
            pass
