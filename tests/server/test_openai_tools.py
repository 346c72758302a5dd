"""Tool calling in /v1/chat/completions, through the official ``openai`` client and the fake engine.

The fake engine answers canned text (what a model would write) for prompts holding a word, and
records the parameters the route sent it, so each test checks both sides: the constraint a
tool_choice asks of the engine, and how the answer comes back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.server.conftest import MODEL_NAME, LiveServer, start_server
from tests.server.tiny_tokenizer import WORDS

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
REPLIES = {
    "cat": 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "mat": "It is sunny in Paris.",
    "sat": '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
    "world": '{"city": "Paris"}',
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    record = tmp_path_factory.mktemp("record") / "requests.jsonl"
    live = start_server(tiny_model_dir, {"replies": REPLIES, "reply_chunk": 7, "record_to": str(record),
                                         "kv_blocks": 1024}, engine={"max_model_len": 1024},
                        model={"enable_auto_tool_choice": True})  # fmt: skip
    yield live, record
    live.stop()


@pytest.fixture
def client(server: tuple[LiveServer, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0].url}/v1", api_key="unused", max_retries=0)


def last_sent(server: tuple[LiveServer, Path]) -> dict[str, Any]:
    return json.loads(server[1].read_text().splitlines()[-1])["params"]


def ask(word: str) -> list[Any]:
    return [{"role": "user", "content": f"hello {word}"}]


def streamed(chunks: Any) -> tuple[str, dict[int, dict[str, str]], list[str | None]]:
    """Content, calls by index (id, name, arguments joined) and finish reasons of a stream."""
    content, calls, finishes = "", {}, []
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finishes.append(choice.finish_reason)
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
    return content, calls, finishes


def test_auto_parses_the_models_own_call(client: openai.OpenAI, server: tuple[LiveServer, Path]) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=ask("cat"), tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert last_sent(server)["structured"] is None


def test_auto_streams_content_then_the_call_in_openais_shape(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=ask("cat"), tools=TOOLS, stream=True))
    content, calls, finishes = streamed(chunks)
    assert content.strip() == "Let me look." and "<tool" not in content
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    heads = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert heads[0].function.name == "get_weather" and heads[0].function.arguments == ""
    assert heads[1].id is None and heads[1].function.name is None  # then the arguments alone
    assert [f for f in finishes if f] == ["tool_calls"]


def test_auto_answer_without_a_call_is_plain_content(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=ask("mat"), tools=TOOLS)
    assert out.choices[0].message.content == REPLIES["mat"] and out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"
    content, calls, _ = streamed(client.chat.completions.create(model=MODEL_NAME, messages=ask("mat"), tools=TOOLS,
                                                                stream=True))  # fmt: skip
    assert content == REPLIES["mat"] and calls == {}


@pytest.mark.parametrize("stream", [False, True])
def test_required_sends_the_call_list_schema_and_answers_every_call(client: openai.OpenAI, stream: bool,
                                                                    server: tuple[LiveServer, Path]) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=ask("sat"), tools=TOOLS, tool_choice="required",
                                         stream=stream)  # fmt: skip
    if stream:
        content, calls, finishes = streamed(out)
        names = [calls[k]["name"] for k in sorted(calls)]
        assert content == "" and [f for f in finishes if f] == ["tool_calls"]
    else:
        names = [c.function.name for c in out.choices[0].message.tool_calls]
        assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
    assert names == ["get_weather", "get_time"]
    schema = json.loads(last_sent(server)["structured"]["json"])
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert [b["properties"]["name"] for b in schema["items"]["anyOf"]] == [{"enum": ["get_weather"]},
                                                                           {"enum": ["get_time"]}]


def test_parallel_tool_calls_false_allows_one_call(client: openai.OpenAI, server: tuple[LiveServer, Path]) -> None:
    client.chat.completions.create(model=MODEL_NAME, messages=ask("sat"), tools=TOOLS, tool_choice="required",
                                   parallel_tool_calls=False)  # fmt: skip
    assert json.loads(last_sent(server)["structured"]["json"])["maxItems"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_always_called_with_constrained_arguments(client: openai.OpenAI, stream: bool,
                                                                      server: tuple[LiveServer, Path]) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model=MODEL_NAME, messages=ask("world"), tools=TOOLS, tool_choice=named,
                                         stream=stream)  # type: ignore[call-overload]  # fmt: skip
    if stream:
        chunks = list(out)
        _, calls, _ = streamed(chunks)
        call = (calls[0]["name"], calls[0]["arguments"])
        fragments = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(fragments) > 2  # the head, then the arguments as they were generated
    else:
        call = (out.choices[0].message.tool_calls[0].function.name,
                out.choices[0].message.tool_calls[0].function.arguments)  # fmt: skip
    assert call[0] == "get_weather" and json.loads(call[1]) == {"city": "Paris"}
    assert json.loads(last_sent(server)["structured"]["json"]) == WEATHER


def test_none_shows_no_tools_and_parses_nothing(client: openai.OpenAI, server: tuple[LiveServer, Path]) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=ask("cat"), tools=TOOLS, tool_choice="none")
    assert out.choices[0].message.content == REPLIES["cat"] and out.choices[0].finish_reason == "stop"
    assert last_sent(server)["structured"] is None


def test_tool_results_go_back_through_the_template(client: openai.OpenAI, server: tuple[LiveServer, Path]) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ask("mat"), {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "on"}]  # fmt: skip
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    assert out.choices[0].message.content == REPLIES["mat"]
    # The tiny template knows no tools: the tool turn became a user turn holding the result ("on"),
    # and the tools were put into a system turn, which the prompt starts with.
    prompt = json.loads(server[1].read_text().splitlines()[-1])["prompt"]
    words = [WORDS[i] for i in prompt]
    assert words[:3] == ["system", ":", "<unk>"] and words.count("user") == 2 and "on" in words


def test_sampling_fields_reach_the_engine(client: openai.OpenAI, server: tuple[LiveServer, Path]) -> None:
    client.chat.completions.create(
        model=MODEL_NAME, messages=ask("mat"), presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={"5": 2},
        seed=3, max_tokens=50, max_completion_tokens=9, user="someone",
        extra_body={"min_tokens": 2, "stop_token_ids": [7]})  # fmt: skip
    sent = last_sent(server)
    assert (sent["presence_penalty"], sent["frequency_penalty"], sent["logit_bias"]) == (0.5, -0.25, [[5, 2.0]])
    assert (sent["seed"], sent["max_new_tokens"], sent["min_new_tokens"], sent["stop_token_ids"]) == (3, 9, 2, [7])
