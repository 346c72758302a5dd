"""Tools and tool_choice checked; the constraint each choice sends; conversations through templates."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from lmserve.engine.tokenizer import Tokenizer
from lmserve.errors import InvalidRequestError
from lmserve.server.protocol.openai import ChatMessage
from lmserve.server.tools.parsers import HermesParser, Llama3JsonParser
from lmserve.server.tools.render import template_knows_tools, template_messages
from lmserve.server.tools.spec import ToolChoice, constraint, parse_tool_choice, parse_tools
from tests.server.tiny_tokenizer import build_tiny_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]  # fmt: skip
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = [
    ChatMessage(role="user", content="Weather in Paris?"),
    ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [CALL]}),
    ChatMessage(role="tool", content='{"temp": 21}', tool_call_id="call_1"),
]
NATIVE_TEMPLATE = (
    "{% if tools %}TOOLS {% for t in tools %}{{ t.function.name }} {% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
    "{% if m.tool_call_id %} (for {{ m.tool_call_id }} {{ m.name }}){% endif %}\n{% endfor %}"
)


def test_required_constrains_to_a_list_of_calls_of_the_given_tools() -> None:
    tools = parse_tools(TOOLS)
    spec = constraint(tools, ToolChoice("required"), parallel=True)
    assert spec is not None and spec.json is not None
    schema = json.loads(spec.json)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}},
                         {"name": "get_time", "arguments": {}}], schema)  # fmt: skip
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "nope", "arguments": {}}],
                [{"name": "get_time"}]):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = json.loads(constraint(tools, ToolChoice("required"), parallel=False).json)  # type: ignore[union-attr,arg-type]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {}}] * 2, single)


def test_a_named_choice_constrains_to_that_functions_arguments() -> None:
    tools = parse_tools(TOOLS)
    choice = parse_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    spec = constraint(tools, choice, parallel=True)
    assert spec is not None and json.loads(spec.json or "") == WEATHER
    assert constraint(tools, ToolChoice("auto"), True) is None and constraint(tools, ToolChoice("none"), True) is None


@pytest.mark.parametrize(("tools", "choice", "field", "mentions"), [
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools[0].function.name", "bad name!"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools[0].function.parameters", ""),
    ([TOOLS[1], TOOLS[1]], None, "tools[1].function.name", "twice"),
    (TOOLS, "sometimes", "tool_choice", "none, auto, required"),
    ([], "required", "tool_choice", "needs tools"),
    (TOOLS, {"type": "function", "function": {"name": "get_news"}}, "tool_choice.function.name",
     "get_weather, get_time"),
])  # fmt: skip
def test_bad_tools_and_choices_are_refused_by_name(tools: list, choice: object, field: str, mentions: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_tool_choice(choice, parse_tools(tools))  # type: ignore[arg-type]
    assert err.value.field == field and mentions in err.value.message


def test_default_choice_is_auto_with_tools_and_none_without() -> None:
    assert parse_tool_choice(None, parse_tools(TOOLS)).mode == "auto"
    assert parse_tool_choice(None, []).mode == "none"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Tokenizer]:
    plain = build_tiny_tokenizer(tmp_path_factory.mktemp("plain"))
    native = build_tiny_tokenizer(tmp_path_factory.mktemp("native"))
    config_path = native / "tokenizer_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"chat_template": NATIVE_TEMPLATE}))
    return Tokenizer(Path(plain)), Tokenizer(Path(native))


def test_a_template_that_knows_tools_gets_them_and_the_calls_natively(tokenizers: tuple[Tokenizer, Tokenizer]) -> None:
    tok = tokenizers[1]
    assert template_knows_tools(tok.hf.chat_template)
    messages, variables = template_messages(CONVERSATION, parse_tools(TOOLS), HermesParser(), native=True)
    text = tok.apply_chat_template(messages, add_generation_prompt=False, **variables)
    assert text == ('TOOLS get_weather get_time user: Weather in Paris?assistant: CALL get_weather(Paris)'
                    'tool: {"temp": 21} (for call_1 get_weather)')  # (the template engine trims newlines)


def test_a_template_without_tools_gets_the_documented_fallback(tokenizers: tuple[Tokenizer, Tokenizer]) -> None:
    tok = tokenizers[0]
    assert not template_knows_tools(tok.hf.chat_template)
    parser = Llama3JsonParser()
    messages, variables = template_messages(CONVERSATION, parse_tools(TOOLS), parser, native=False)
    assert variables == {} and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert '"name": "get_weather"' in system and "Weather now" in system and parser.instructions() in system
    assert parser.parse(messages[2]["content"])[1][0].name == "get_weather"
    assert messages[3]["content"] == '<tool_response>\n{"temp": 21}\n</tool_response>'
    text = tok.apply_chat_template(messages)  # the template takes them as they are
    assert text.startswith("system : You can call these functions:")


def test_a_system_message_keeps_its_text_after_the_tools() -> None:
    system = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="hi")]
    messages, _ = template_messages(system, parse_tools(TOOLS), HermesParser(), native=False)
    assert len(messages) == 2 and messages[0]["content"].endswith("\n\nBe brief.")
    assert "<tool_call>" in messages[0]["content"]


def test_bad_arguments_in_an_earlier_call_are_refused_by_name() -> None:
    bad = ChatMessage.model_validate({"role": "assistant", "tool_calls": [CALL | {"function": {
        "name": "get_weather", "arguments": "{city"}}]})  # fmt: skip
    with pytest.raises(InvalidRequestError) as err:
        template_messages([bad], [], HermesParser(), native=True)
    assert err.value.field == "messages[0].tool_calls[0].function.arguments"


def test_the_plan_keeps_a_special_token_marker_but_not_the_eos_text() -> None:
    from lmserve.engine.sampling_params import SamplingParams
    from lmserve.engine.structured_spec import StructuredOutputs
    from lmserve.server.tools.parsers import MistralParser
    from lmserve.server.tools.plan import ToolPlan

    params = ToolPlan([], parser=MistralParser(), eos_texts=("</s>",)).apply(SamplingParams(stop=["x"]))
    assert params.skip_special_tokens is False and params.stop == ("x", "</s>")
    assert ToolPlan([], parser=HermesParser()).apply(SamplingParams()) == SamplingParams()
    required = ToolPlan([], structured=StructuredOutputs(json="{}"))
    assert required.apply(SamplingParams()).structured == StructuredOutputs(json="{}")
    with pytest.raises(InvalidRequestError) as err:
        required.apply(SamplingParams(structured=StructuredOutputs(json_object=True)))
    assert err.value.field == "tool_choice" and "response_format" in err.value.message
