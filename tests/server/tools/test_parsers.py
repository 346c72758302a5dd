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
    ToolStream,
    parser_for,
)

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


@pytest.mark.parametrize(("parser", "text", "content"), CASES, ids=lambda v: getattr(v, "name", None))
def test_each_family_format_parses_to_the_calls(parser: ToolParser, text: str, content: str) -> None:
    got_content, calls = parser.parse(text)
    assert got_content == content
    assert calls_of(calls) == [("get_weather", WEATHER), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize(("parser", "text", "content"), CASES, ids=lambda v: getattr(v, "name", None))
def test_streamed_in_chunks_cut_anywhere_no_call_text_leaks_as_content(parser: ToolParser, text: str,
                                                                       content: str) -> None:
    for cut in range(1, len(text)):  # two chunks, the cut at every position (mid-tag included)
        for size in (cut, 3):
            stream, sent = ToolStream(parser), ""
            for at in range(0, len(text), size):
                sent += stream.feed(text[at:at + size])
            rest, calls = stream.finish()
            assert (sent + rest).strip() == content, (cut, size, sent)
            assert calls_of(calls) == [("get_weather", WEATHER), ("get_time", {})]


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser(), MistralParser()], ids=lambda p: p.name)
def test_plain_answers_stream_as_content_and_have_no_calls(parser: ToolParser) -> None:
    text = "The weather in Paris is mild <tool and [TOOL things."
    assert parser.parse(text) == (text, [])
    stream = ToolStream(parser)
    sent = "".join(stream.feed(text[i:i + 4]) for i in range(0, len(text), 4))
    rest, calls = stream.finish()
    assert sent + rest == text and calls == []


def test_content_is_released_as_soon_as_it_cannot_start_a_call() -> None:
    stream = ToolStream(HermesParser())
    assert stream.feed("Hi <tool") == "Hi "  # "<tool" may still become <tool_call>
    assert stream.feed("box> ok") == "<toolbox> ok"
    assert ToolStream(Llama3JsonParser()).feed("Sure, ") == "Sure, "
    assert ToolStream(Llama3JsonParser()).feed('  {"na') == ""


@pytest.mark.parametrize("text", [
    "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>[1, 2]</tool_call>",
])  # fmt: skip
def test_a_malformed_call_is_content_not_an_error(text: str) -> None:
    assert HermesParser().parse(text) == (text, [])
    stream = ToolStream(HermesParser())
    assert stream.feed(text) + stream.finish()[0] == text


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
