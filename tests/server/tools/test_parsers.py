"""Tool calls out of each family's answers, whole and streamed in chunks cut anywhere."""

from __future__ import annotations

import json

import pytest

from lmserve.server.tools.parsers import (
    FAMILY_PARSERS,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    NamedParser,
    RequiredParser,
    ToolCall,
    ToolParser,
    parser_for,
)
from lmserve.server.tools.stream import Piece, ToolStream

WEATHER = {"city": "Paris", "unit": "celsius"}
HERMES = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')  # fmt: skip
LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; {"name": "get_time", "parameters": {}}'
MISTRAL = 'Let me look.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, ' \
          '{"name": "get_time", "arguments": {}}]'  # fmt: skip
CASES = [(HermesParser(), HERMES, "Let me look."), (Llama3JsonParser(), LLAMA, ""),
         (MistralParser(), MISTRAL, "Let me look.")]  # fmt: skip


def calls_of(calls: list[ToolCall]) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def replay(parser: ToolParser, chunks: list[str]) -> tuple[str, list[tuple[str, object]], bool]:
    """Stream ``chunks``; the content sent, the calls as a client assembles them, whether it called."""
    stream, pieces = ToolStream(parser), []
    for chunk in chunks:
        pieces += stream.feed(chunk)
    rest, called = stream.finish()
    return assemble(pieces + rest) + (called,)


def assemble(pieces: list[Piece]) -> tuple[str, list[tuple[str, object]]]:
    content, calls = "", {}
    for piece in pieces:
        content += piece.get("content", "")
        for call in piece.get("tool_calls", ()):
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            if "id" in call:  # the head: id and name, arguments empty
                assert call["id"].startswith("call_") and call["function"]["arguments"] == "" and not entry["name"]
            entry["name"] += call["function"].get("name", "")
            entry["arguments"] += call["function"]["arguments"]
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


@pytest.mark.parametrize(("parser", "text", "content"), CASES, ids=lambda v: getattr(v, "name", None))
def test_each_family_format_parses_to_the_calls(parser: ToolParser, text: str, content: str) -> None:
    got_content, calls = parser.parse(text)
    assert got_content == content
    assert calls_of(calls) == [("get_weather", WEATHER), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize(("parser", "text", "content"), CASES, ids=lambda v: getattr(v, "name", None))
def test_streamed_in_chunks_cut_anywhere_no_call_text_leaks_as_content(parser: ToolParser, text: str,
                                                                       content: str) -> None:
    for cut in range(1, len(text)):  # two chunks, the cut at every position (mid-tag included); then 3 at a time
        for size in (cut, 3):
            sent, calls, called = replay(parser, [text[at:at + size] for at in range(0, len(text), size)])
            assert sent.strip() == content and called, (cut, size, sent)
            assert calls == [("get_weather", WEATHER), ("get_time", {})]


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser(), MistralParser()], ids=lambda p: p.name)
def test_plain_answers_stream_as_content_and_have_no_calls(parser: ToolParser) -> None:
    text = "The weather in Paris is mild <tool and [TOOL things."
    assert parser.parse(text) == (text, [])
    assert replay(parser, [text[i:i + 4] for i in range(0, len(text), 4)]) == (text, [], False)


def test_content_is_released_as_soon_as_it_cannot_start_a_call() -> None:
    stream = ToolStream(HermesParser())
    assert stream.feed("Hi <tool") == [{"content": "Hi "}]  # "<tool" may still become <tool_call>
    assert stream.feed("box> ok") == [{"content": "<toolbox> ok"}]
    assert ToolStream(Llama3JsonParser()).feed("Sure, ") == [{"content": "Sure, "}]
    assert ToolStream(Llama3JsonParser()).feed('  {"na') == []


@pytest.mark.parametrize("text", [
    "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>[1, 2]</tool_call>",
])  # fmt: skip
def test_a_malformed_call_is_content_not_an_error(text: str) -> None:
    assert HermesParser().parse(text) == (text, [])
    assert replay(HermesParser(), [text]) == (text, [], False)


def test_unclosed_call_at_the_end_and_arguments_written_as_text_still_parse() -> None:
    _, calls = HermesParser().parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert calls_of(calls) == [("f", {"a": 1})]


def test_render_writes_calls_the_parser_reads_back() -> None:
    calls = [ToolCall("get_weather", json.dumps(WEATHER)), ToolCall("get_time", "{}")]
    for parser in (HermesParser(), Llama3JsonParser(), MistralParser()):
        assert calls_of(parser.parse(parser.render(calls))[1]) == calls_of(calls), parser.name


def test_required_and_named_answers() -> None:
    _, calls = RequiredParser().parse('[{"name": "get_time", "arguments": {}}]')
    assert calls_of(calls) == [("get_time", {})]
    _, calls = NamedParser("get_weather").parse(json.dumps(WEATHER))
    assert calls_of(calls) == [("get_weather", WEATHER)]
    assert RequiredParser().parse('[{"name": "get_ti') == ('[{"name": "get_ti', [])  # cut by max_tokens


def test_the_parser_is_configured_or_chosen_by_family() -> None:
    assert parser_for("mistral", "llama").name == "mistral"
    assert parser_for(None, "llama").name == "llama3_json"
    assert parser_for(None, "qwen2").name == "hermes" and FAMILY_PARSERS["mixtral"] == "mistral"
    assert parser_for(None, "gpt2").name == "hermes" and parser_for(None, None).name == "hermes"


def test_a_named_call_streams_its_arguments_as_they_are_generated() -> None:
    stream = ToolStream(NamedParser("get_weather"))
    first = stream.feed('{"city"')
    assert first[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first[1] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}
    assert stream.feed(': "Paris"}') == [{"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]}]
    assert stream.finish() == ([], True)
    assert replay(NamedParser("f"), ['{"a"', ": 1", "}"]) == ("", [("f", {"a": 1})], True)


def test_required_calls_come_at_the_end_of_the_stream() -> None:
    text = '[{"name": "get_time", "arguments": {}}]'
    assert replay(RequiredParser(), [text[i:i + 5] for i in range(0, len(text), 5)]) == ("", [("get_time", {})], True)
