"""Structured-output fields of every dialect: translated into one constraint, or refused with a 400
that names the field and the problem before any engine sees them (fake engine)."""

from __future__ import annotations

import json

import httpx
import pytest

from lmserve.engine.structured_spec import StructuredOutputs
from lmserve.server.params import lmi_sampling_params, openai_sampling_params
from lmserve.server.protocol.lmi import GenerationParameters
from lmserve.server.protocol.openai import ChatCompletionRequest, CompletionRequest
from tests.server.test_bad_input import assert_error

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _chat(**fields: object) -> StructuredOutputs | None:
    req = ChatCompletionRequest.model_validate(CHAT | fields)
    return openai_sampling_params(req, max_new_tokens=8, logprobs=None, vocab_size=1000).structured


def _lmi(**fields: object) -> StructuredOutputs | None:
    return lmi_sampling_params(GenerationParameters.model_validate(fields), max_new_tokens=8, logprobs=False).structured


def test_each_dialect_field_becomes_one_constraint() -> None:
    text = json.dumps(SCHEMA)
    assert _chat(response_format={"type": "json_schema",
                                  "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}) == StructuredOutputs(json=text)
    assert _chat(response_format={"type": "json_object"}) == StructuredOutputs(json_object=True)
    assert _chat(response_format={"type": "text"}) is None
    assert _chat(guided_json=SCHEMA) == StructuredOutputs(json=text)
    assert _chat(guided_regex="[ab]+") == StructuredOutputs(regex="[ab]+")
    assert _chat(guided_choice=["x", "y"]) == StructuredOutputs(choice=("x", "y"))
    assert _chat(guided_grammar='root ::= "x"') == StructuredOutputs(grammar='root ::= "x"')
    assert _chat(structured_outputs={"json": SCHEMA}) == StructuredOutputs(json=text)
    assert _chat(structured_outputs={"json_object": True}) == StructuredOutputs(json_object=True)
    completion = CompletionRequest.model_validate({"prompt": "hi", "guided_choice": ["x"]})
    assert openai_sampling_params(completion, max_new_tokens=8, logprobs=None, vocab_size=1000).structured == StructuredOutputs(choice=("x",))
    assert _lmi(grammar={"type": "json", "value": SCHEMA}) == StructuredOutputs(json=text)
    assert _lmi(grammar={"type": "regex", "value": "[0-9]+"}) == StructuredOutputs(regex="[0-9]+")
    assert _lmi(guided_choice=["x", "y"]) == StructuredOutputs(choice=("x", "y"))
    assert _lmi() is None and _chat() is None


BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}}


@pytest.mark.parametrize(("route", "body", "field", "mentions"), [
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": BAD_SCHEMA}}}, "response_format.json_schema.schema", "properties/a/minimum"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "xml"}}, "response_format.type", ""),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
     "guided_regex", "conflicts with response_format"),
    ("/v1/completions", {"prompt": "hi", "guided_json": "{not json"}, "guided_json", "not valid json"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "(a"}, "guided_regex", "unclosed group"),
    ("/v1/completions", {"prompt": "hi", "guided_choice": []}, "guided_choice", "non-empty"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["a"]}},
     "structured_outputs", "exactly one"),
    ("/v1/completions", {"prompt": "hi", "guided_grammar": "start: undefined_rule"}, "guided_grammar", "undefined"),
    ("/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "[z-a]"}}},
     "parameters.grammar.value", "cannot be compiled"),
    ("/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "json", "value": {"type": 5}}}},
     "parameters.grammar.value", "not a valid json schema"),
    ("/invocations", {"inputs": "hi", "parameters": {"guided_choice": ["a"], "grammar": {"type": "regex", "value": "a"}}},
     "parameters.guided_choice", "conflicts with parameters.grammar.value"),
])  # fmt: skip
def test_bad_constraints_are_400s_naming_the_field(http: httpx.Client, route: str, body: dict, field: str,
                                                  mentions: str) -> None:
    assert_error(http.post(route, json=body), 400, field, mentions)
