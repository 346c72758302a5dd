"""Prompts that cannot fit are refused before they cost memory; tokenizing is capped; a new-token
limit that does not fit beside its prompt is a 400 naming the numbers (or clamped, when configured)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmserve.engine.prompt_limits import max_prompt_chars
from lmserve.server.prompts import TOKENIZE_THREADS
from tests.server.conftest import MAX_MODEL_LEN, LiveServer, start_server
from tests.server.test_bad_input import assert_error

TOO_LONG = "w1 " * (max_prompt_chars(MAX_MODEL_LEN) // 3 + 1)  # one character past the bound
CHAT = [{"role": "user", "content": "hello world"}]


class SpyTokenizer:
    """The model's tokenizer, counting the texts it is asked to tokenize; with ``gate``, each
    ``encode`` waits for it, so a test can see how many run at once."""

    def __init__(self, real: Any, gate: threading.Event | None = None) -> None:
        self.real, self.gate = real, gate
        self.calls = self.active = self.most_active = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._lock:
            self.calls += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            if self.gate is not None:
                self.gate.wait(30)
            return self.real.encode(text, add_special_tokens=add_special_tokens)  # type: ignore[no-any-return]
        finally:
            with self._lock:
                self.active -= 1

    def chat_prompt_ids(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        rendered = self.real.apply_chat_template(messages, **kwargs)
        return self.encode(rendered, add_special_tokens=False)


@pytest.fixture
def spy(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> SpyTokenizer:
    tokenizer = SpyTokenizer(live.runtime.tokenizer)
    monkeypatch.setattr(live.runtime, "tokenizer", tokenizer)
    return tokenizer


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/invocations", {"inputs": TOO_LONG}, "inputs"),
    ("/invocations", {"inputs": ["hello", TOO_LONG]}, "inputs[1]"),
    ("/generate", {"inputs": TOO_LONG}, "inputs"),
    ("/generate_stream", {"inputs": TOO_LONG}, "inputs"),
    ("/v1/completions", {"prompt": TOO_LONG}, "prompt"),
    ("/v1/completions", {"prompt": ["hello", TOO_LONG]}, "prompt[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, "messages"),
])  # fmt: skip
def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing(http: httpx.Client, spy: SpyTokenizer, route: str,
                                                                 body: dict, field: str) -> None:
    r = http.post(route, json=body)
    assert_error(r, 400, field, f"max_model_len {MAX_MODEL_LEN}")
    assert str(max_prompt_chars(MAX_MODEL_LEN)) in r.json()["error"] and str(len(TOO_LONG)) in r.json()["error"]
    assert spy.calls == (1 if field.endswith("[1]") else 0)  # only the short prompt before it was tokenized


def test_a_long_document_with_truncate_is_served(http: httpx.Client) -> None:
    r = http.post("/generate", json={"inputs": TOO_LONG + " hello world",
                                     "parameters": {"truncate": 2, "max_new_tokens": 1, "details": True}})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["details"]["generated_tokens"] == 1


@pytest.fixture(scope="module")
def roomy(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server whose context holds prompts long enough to be tokenized off the event loop."""
    server = start_server(tiny_model_dir, {"kv_blocks": 8192}, max_request_bytes=1024 * 1024,
                          engine={"max_model_len": 16384})  # fmt: skip
    yield server
    server.stop()


def test_concurrent_tokenizations_never_exceed_the_cap(roomy: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    spy = SpyTokenizer(roomy.runtime.tokenizer, gate)
    monkeypatch.setattr(roomy.runtime, "tokenizer", spy)
    prompt = "w1 " * 8000  # 24,000 characters: tokenized on the pool, not the event loop
    answers: list[int] = []

    def send() -> None:
        with roomy.client(timeout=60) as http:
            answers.append(http.post("/invocations", json={"inputs": prompt, "parameters": {"max_new_tokens": 1}})
                           .status_code)

    senders = [threading.Thread(target=send) for _ in range(3 * TOKENIZE_THREADS)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 30
    while spy.calls < TOKENIZE_THREADS and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # room for more tokenizations to start, were they allowed to
    gate.set()
    for sender in senders:
        sender.join(60)
    assert answers == [200] * len(senders)
    assert spy.calls == len(senders)
    assert spy.most_active == TOKENIZE_THREADS


HELLO_TOKENS = 2  # "hello world" in the tiny tokenizer
ROOM = MAX_MODEL_LEN - HELLO_TOKENS


@pytest.mark.parametrize(("route", "extra", "field"), [
    ("/invocations", {"parameters": {"max_new_tokens": ROOM + 1}}, "parameters.max_new_tokens"),
    ("/generate", {"parameters": {"max_new_tokens": ROOM + 1}}, "parameters.max_new_tokens"),
    ("/generate_stream", {"parameters": {"max_new_tokens": ROOM + 1}}, "parameters.max_new_tokens"),
    ("/v1/completions", {"max_tokens": ROOM + 1}, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": MAX_MODEL_LEN - 1}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": MAX_MODEL_LEN - 1}, "max_completion_tokens"),
])  # fmt: skip
def test_new_tokens_beyond_the_context_are_400_naming_the_numbers(http: httpx.Client, route: str, extra: dict,
                                                                   field: str) -> None:
    body = ({"messages": CHAT} if "chat" in route else {"prompt": "hello world"} if "v1" in route
            else {"inputs": "hello world"}) | extra  # fmt: skip
    r = http.post(route, json=body)
    assert_error(r, 400, field, f"max_model_len is {MAX_MODEL_LEN}")
    requested = extra.get("parameters", extra)
    assert f"is {next(iter(requested.values()))}," in r.json()["error"]
    assert "tokens and" in r.json()["error"]  # the prompt's token count is named too


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/invocations", {"inputs": "hello", "parameters": {"max_new_tokens": MAX_MODEL_LEN + 1}},
     "parameters.max_new_tokens"),
    ("/v1/completions", {"prompt": [5], "max_tokens": 10**6}, "max_tokens"),
])  # fmt: skip
def test_new_tokens_beyond_max_model_len_are_refused_outright(http: httpx.Client, route: str, body: dict,
                                                              field: str) -> None:
    assert_error(http.post(route, json=body), 400, field, f"more than max_model_len {MAX_MODEL_LEN}")


def test_omitted_limits_take_the_rest_of_the_context(http: httpx.Client) -> None:
    prompt = " ".join(["hello"] * (MAX_MODEL_LEN - 10))  # the LMI default (30) would not fit
    r = http.post("/invocations", json={"inputs": prompt, "parameters": {"details": True}})
    assert r.status_code == 200, r.text
    assert r.json()["details"]["generated_tokens"] == 10
    chat = http.post("/v1/chat/completions", json={"messages": CHAT})
    assert chat.status_code == 200 and chat.json()["usage"]["total_tokens"] == MAX_MODEL_LEN


@pytest.fixture(scope="module")
def clamping(tiny_model_dir: Path) -> Iterator[LiveServer]:
    server = start_server(tiny_model_dir, model={"max_tokens_policy": "clamp"})
    yield server
    server.stop()


def test_clamp_policy_generates_what_fits(clamping: LiveServer) -> None:
    with clamping.client() as http:
        r = http.post("/invocations", json={"inputs": "hello world",
                                            "parameters": {"max_new_tokens": ROOM + 1, "details": True}})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["details"]["generated_tokens"] == ROOM
        assert r.json()["details"]["finish_reason"] == "length"
        out = http.post("/v1/completions", json={"prompt": "hello world", "max_tokens": MAX_MODEL_LEN})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == ROOM
        assert_error(http.post("/v1/completions", json={"prompt": "hello", "max_tokens": MAX_MODEL_LEN + 1}),
                     400, "max_tokens", "more than max_model_len")
