"""Bad requests get a 4xx that names the problem; the engine never sees them and keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN


def assert_error(r: httpx.Response, status: int, field: str | None = None, mentions: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == status and isinstance(body["error"], str) and body["error"]
    if field is not None:
        assert body["field"] == field, body
    assert mentions.lower() in body["error"].lower(), body


@pytest.mark.parametrize(("body", "field", "mentions"), [
    ({"inputs": "hi", "parameters": {"max_new_token": 5}}, "parameters.max_new_token", "unknown field"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, "parameters.max_new_tokens", "integer"),
    ({"inputs": "hi", "parameters": {"temperature": -1.0}}, "parameters.temperature", "[0, 100]"),
    ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "parameters.top_p", "(0, 1]"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens", ">= 1"),
    ({"inputs": "hi", "parameters": {"decoder_input_details": True}}, "parameters.decoder_input_details",
     "not supported"),
    ({"inputs": "hi", "parameters": {"stop_sequences": ["", "x"]}}, "parameters.stop_sequences", "non-empty"),
    ({"inputs": ""}, "inputs", "empty"),
    ({"inputs": []}, "inputs", "empty"),
    ({"inputs": ["a", ""]}, "inputs[1]", "empty"),
    ({"inputs": 5}, "inputs", ""),
    ({"parameters": {}}, "inputs", "required"),
    ({"inputs": ["a", "b"], "stream": True}, "inputs", "one input"),
    ({"inputs": " ".join(["hello"] * MAX_MODEL_LEN)}, "inputs", f"max_model_len {MAX_MODEL_LEN}"),
])  # fmt: skip
def test_lmi_bad_parameters(http: httpx.Client, body: dict, field: str, mentions: str) -> None:
    assert_error(http.post("/invocations", json=body), 400, field, mentions)


@pytest.mark.parametrize(("route", "body", "field", "mentions"), [
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n", ""),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
    ("/v1/completions", {"prompt": "hi", "n": 3, "best_of": 2}, "best_of", ">= n (3)"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2, "stream": True}, "best_of", "stream"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias", "token ids in [0,"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"w1": 1}}, "logit_bias", "'w1'"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"3": 200}}, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, "prompt", "token ids"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs", ""),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": -3}, "presence_penalty", "[-2, 2]"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**40}, "max_tokens", ""),
    ("/v1/chat/completions", {"messages": []}, "messages", ""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs", "logprobs=true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "x"}]},
     "tools[0]", "function"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]},
     "messages[1].role", "one of system, developer, user, assistant, tool"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id",
     "required"),
    ("/generate", {"inputs": "hi", "parameters": {"best_of": 2}}, "parameters.best_of", "best_of=1"),
    ("/generate", {"inputs": "hi", "parameters": {"frequency_penalty": 3.0}}, "parameters.frequency_penalty", "[-2, 2]"),
    ("/generate", {"inputs": "hi", "stream": True}, "stream", "unknown field"),
])  # fmt: skip
def test_other_dialects_bad_parameters(http: httpx.Client, route: str, body: dict, field: str,
                                       mentions: str) -> None:
    assert_error(http.post(route, json=body), 400, field, mentions)


@pytest.mark.parametrize("content", [
    b"{not json",
    b'{"inputs": "\xff\xfe"}',
    b"\xff\xfe\x00\x01",
    b'{"inputs": "\\ud800 lone surrogate"}',
    b'{"inputs": "hi", "parameters": {"temperature": NaN}}',
    b"[1, 2, 3]",
    b"",
])  # fmt: skip
def test_undecodable_bodies_are_400(http: httpx.Client, content: bytes) -> None:
    r = http.post("/invocations", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_oversized_body_is_413_declared_or_streamed(http: httpx.Client) -> None:
    big = b'{"inputs": "' + b"a" * (65 * 1024) + b'"}'
    assert_error(http.post("/invocations", content=big, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the limit applies while reading
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_error(http.post("/invocations", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_unknown_route_and_method_use_the_error_body(http: httpx.Client) -> None:
    assert_error(http.get("/nope"), 404)
    assert_error(http.get("/invocations"), 405)


def test_engine_still_serves_after_all_that(http: httpx.Client) -> None:
    r = http.post("/invocations", json={"inputs": "hello world", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and r.json()["generated_text"]
    assert http.get("/ping").status_code == 200


def test_developer_is_the_system_role(http: httpx.Client) -> None:
    """OpenAI's newer name for the system role reaches the template as ``system``: the same prompt,
    so the same greedy answer (the fake engine's answer follows the prompt's ids)."""
    def answer(role: str) -> str:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": role, "content": "hi"}],
                                                    "max_tokens": 3, "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])

    assert answer("developer") == answer("system") != answer("user")
