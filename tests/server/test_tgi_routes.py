"""TGI routes, and huggingface_hub's InferenceClient pointed at the server's base URL."""

from __future__ import annotations

import json

import httpx
from huggingface_hub import InferenceClient

from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, LiveServer
from tests.server.test_lmi_routes import HELLO, greedy_words


def sse_payloads(response: httpx.Response) -> list[dict]:
    return [json.loads(line[len("data:"):]) for line in response.iter_lines() if line.startswith("data:")]


def test_generate_with_details(http: httpx.Client) -> None:
    r = http.post("/generate", json={"inputs": "hello world",
                                     "parameters": {"max_new_tokens": 3, "details": True, "top_n_tokens": 2}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generated_text"] == " ".join(greedy_words(HELLO, 3))
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 3
    assert [t["text"] for t in details["tokens"]] == greedy_words(HELLO, 3)
    assert all(t["special"] is False for t in details["tokens"])
    assert [len(top) for top in details["top_tokens"]] == [2, 2, 2]


def test_generate_stream_is_sse_with_final_details(http: httpx.Client) -> None:
    with http.stream("POST", "/generate_stream", json={"inputs": "hello world",
                                                       "parameters": {"max_new_tokens": 3}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(r)
    assert [e["index"] for e in events] == [1, 2, 3]
    assert "".join(e["token"]["text"] for e in events) == " ".join(greedy_words(HELLO, 3))
    assert [e["generated_text"] for e in events[:-1]] == [None, None]
    assert events[-1]["generated_text"] == " ".join(greedy_words(HELLO, 3))
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 3, "input_length": 2,
                                     "seed": None}  # fmt: skip


def test_root_route_streams_only_when_asked(http: httpx.Client) -> None:
    plain = http.post("/", json={"inputs": "hello world", "parameters": {"max_new_tokens": 2}})
    assert plain.json() == [{"generated_text": " ".join(greedy_words(HELLO, 2))}]
    with http.stream("POST", "/", json={"inputs": "hello world", "stream": True,
                                        "parameters": {"max_new_tokens": 2}}) as r:
        assert len(sse_payloads(r)) == 2


def test_info_describes_model_and_limits(http: httpx.Client) -> None:
    info = http.get("/info").json()
    assert info["model_id"] == MODEL_NAME
    assert info["max_total_tokens"] == MAX_MODEL_LEN and info["max_input_tokens"] == MAX_MODEL_LEN - 1


def test_inference_client_text_generation(live: LiveServer) -> None:
    client = InferenceClient(model=live.url)
    assert client.text_generation("hello world", max_new_tokens=4) == " ".join(greedy_words(HELLO, 4))
    detailed = client.text_generation("hello world", max_new_tokens=2, details=True, stop=["w99"])
    assert detailed.details.finish_reason == "length" and detailed.details.generated_tokens == 2


def test_inference_client_streaming(live: LiveServer) -> None:
    client = InferenceClient(model=live.url)
    tokens = list(client.text_generation("hello world", max_new_tokens=4, stream=True))
    assert "".join(tokens) == " ".join(greedy_words(HELLO, 4)) and len(tokens) == 4
    last = list(client.text_generation("hello world", max_new_tokens=2, stream=True, details=True))[-1]
    assert last.generated_text == " ".join(greedy_words(HELLO, 2)) and last.details.generated_tokens == 2
