"""OpenAI routes, through the official ``openai`` client and raw SSE."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import MODEL_NAME, LiveServer
from tests.server.test_lmi_routes import HELLO, greedy_words

# The chat template renders "user : hello assistant : " -> ids of user, :, hello, assistant, :
CHAT = [{"role": "user", "content": "hello"}]
CHAT_IDS = [53, 56, 43, 54, 56]


@pytest.fixture
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=3, temperature=0)
    assert out.choices[0].text == " ".join(greedy_words(HELLO, 3))
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (2, 3, 5)


def test_completion_defaults_to_16_tokens_and_takes_token_ids(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt=HELLO, temperature=0)
    assert out.choices[0].text == " ".join(greedy_words(HELLO, 16))


def test_completion_logprobs_and_stop(client: openai.OpenAI) -> None:
    words = greedy_words(HELLO, 5)
    out = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=5, temperature=0,
                                    logprobs=2, stop=words[3])  # fmt: skip
    choice = out.choices[0]
    assert choice.text == " ".join(words[:3]) + " " and choice.finish_reason == "stop"
    assert choice.logprobs.tokens == words[:4]
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[:2] == [0, len(words[0])]


def test_completion_n_fans_out_with_consecutive_seeds(client: openai.OpenAI) -> None:
    sampled = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=6, n=3, seed=7)
    texts = [c.text for c in sampled.choices]
    assert [c.index for c in sampled.choices] == [0, 1, 2] and len(set(texts)) == 3
    second = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=6, seed=8)
    assert second.choices[0].text == texts[1]
    assert sampled.usage.prompt_tokens == 2 and sampled.usage.completion_tokens == 18
    greedy = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=4, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == " ".join(greedy_words(HELLO, 4))
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 2


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_continuous_usage_stats_counts_tokens_in_every_chunk(client: openai.OpenAI, route: str) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}  # as vLLM accepts and load testers send
    if route == "completions":
        chunks = list(client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=4,
                                                temperature=0, stream=True, stream_options=options))  # fmt: skip
        prompt_tokens = 2
    else:
        chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0,
                                                     stream=True, stream_options=options))  # fmt: skip
        prompt_tokens = len(CHAT_IDS)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 4  # grows chunk by chunk up to the total
    assert all(c.usage.prompt_tokens == prompt_tokens for c in chunks)


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=3, temperature=0,
                                         logprobs=True, top_logprobs=2)  # fmt: skip
    message = out.choices[0].message
    assert message.role == "assistant" and message.content == " ".join(greedy_words(CHAT_IDS, 3))
    assert [entry.token for entry in out.choices[0].logprobs.content] == greedy_words(CHAT_IDS, 3)
    assert all(len(entry.top_logprobs) == 2 for entry in out.choices[0].logprobs.content)
    assert out.usage.prompt_tokens == len(CHAT_IDS)


def test_chat_without_max_tokens_fills_the_context(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == 64


def test_chat_stream(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=3, temperature=0,
                                                 stream=True, n=2, stream_options={"include_usage": True}))
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant", "assistant"]
    for index in (0, 1):
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(p.delta.content or "" for p in parts) == " ".join(greedy_words(CHAT_IDS, 3))
        assert parts[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_raw_sse_ends_with_done(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions",
                     json={"messages": CHAT, "max_tokens": 2, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][5:])["object"] == "chat.completion.chunk"


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hello", max_tokens=1)


def test_completion_echo_puts_the_prompt_first(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=3, temperature=0, echo=True)
    assert out.choices[0].text == "hello world" + " ".join(greedy_words(HELLO, 3))
    ids = client.completions.create(model=MODEL_NAME, prompt=HELLO, max_tokens=1, temperature=0, echo=True)
    assert ids.choices[0].text.startswith("hello world")  # token-id prompts are echoed decoded
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=3, temperature=0,
                                            echo=True, stream=True))  # fmt: skip
    assert chunks[0].choices[0].text.startswith("hello world")
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text


def test_best_of_returns_n_of_the_sampled_choices_and_counts_them_all(client: openai.OpenAI) -> None:
    fanned = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=4, n=3, seed=7)
    best = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=4, n=2, best_of=3, seed=7)
    assert len(best.choices) == 2 and [c.index for c in best.choices] == [0, 1]
    assert {c.text for c in best.choices} <= {c.text for c in fanned.choices}
    assert best.usage.completion_tokens == 12 and best.choices[0].logprobs is None


def test_best_of_ranks_by_cumulative_logprob() -> None:
    from lmserve.engine.outputs import TokenLogprob
    from lmserve.server.generation import Completion
    from lmserve.server.routes.openai_completions import _best

    def done(text: str, *lps: float) -> Completion:
        return Completion([1], text=text, logprobs=[TokenLogprob(3, lp) for lp in lps])

    results = [done("a", -1.0, -1.0), done("b", -0.1, -0.2, -0.3), done("c", -3.0)]
    assert [c.text for c in _best(results, 2)] == ["b", "a"]
    assert [c.text for c in _best(results, 3)] == ["a", "b", "c"]  # n == best_of: in order, unranked


def test_auto_tool_choice_needs_the_operator_to_enable_it(http: httpx.Client) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "tools": tools})
    assert r.status_code == 400 and r.json()["field"] == "tool_choice"
    assert "option.enable_auto_tool_choice=true" in r.json()["error"]
    ok = http.post("/v1/chat/completions", json={"messages": CHAT, "tools": tools, "tool_choice": "none",
                                                  "max_tokens": 2})  # fmt: skip
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_completion_echo_with_logprobs_scores_the_prompt_too(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=2, temperature=0, echo=True,
                                    logprobs=1)  # fmt: skip
    lp = out.choices[0].logprobs
    assert lp.tokens == ["hello", "world", *greedy_words(HELLO, 2)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first prompt token has no context
    assert lp.token_logprobs[1] == -1.0 and lp.top_logprobs[1] == {"world": -1.0}  # the fake engine's score
    assert lp.text_offset[:2] == [0, len("hello")] and lp.text_offset[2] == len("hello world")
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=2, temperature=0,
                                            echo=True, logprobs=1, stream=True))  # fmt: skip
    assert chunks[0].choices[0].logprobs.tokens == ["hello", "world", greedy_words(HELLO, 1)[0]]


@pytest.mark.parametrize(("route", "stream"), [("completions", False), ("completions", True), ("chat", False),
                                               ("chat", True)])  # fmt: skip
def test_usage_counts_the_prompt_tokens_served_from_the_prefix_cache(client: openai.OpenAI, route: str,
                                                                      stream: bool) -> None:
    """Sent twice, a prompt finds its whole blocks (4 tokens each here) in the prefix cache the second
    time: ``usage.prompt_tokens_details.cached_tokens`` says so, as OpenAI's API does (a load test
    that repeats its prompts can tell it measured no prefill for them)."""
    words = " ".join(f"w{i}" for i in range(len(route) + 5 * stream, len(route) + 5 * stream + 10))  # unique

    def usage() -> openai.types.CompletionUsage:
        options = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        if route == "completions":
            out = client.completions.create(model=MODEL_NAME, prompt=words, max_tokens=2, **options)
        else:
            out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": words}],
                                                 max_tokens=2, **options)  # fmt: skip
        return list(out)[-1].usage if stream else out.usage

    first, second = usage(), usage()
    assert first.prompt_tokens_details.cached_tokens == 0
    whole_blocks = (second.prompt_tokens - 1) // 4 * 4  # never the last token: it must be computed
    assert second.prompt_tokens_details.cached_tokens == whole_blocks > 0
