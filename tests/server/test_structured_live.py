"""Structured output through a live server on the default model, with the official ``openai`` client
and the TGI and LMI routes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from lmserve.server.runtime import DEFAULT_ENGINE_FACTORY
from tests.server.conftest import MODEL_NAME, LiveServer, start_server

pytestmark = [pytest.mark.default_model, pytest.mark.slow]

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population_millions"],
          "properties": {"city": {"type": "string", "maxLength": 20},
                         "population_millions": {"type": "integer", "minimum": 0, "maximum": 40}}}
MESSAGES = [{"role": "user", "content": "Name the capital of France and its population as JSON."}]
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(default_model_dir: Path) -> Iterator[LiveServer]:
    live = start_server(default_model_dir, engine_factory=DEFAULT_ENGINE_FACTORY, model_loading_timeout_s=300,
                        predict_timeout_s=120,
                        engine={"dtype": "bf16", "max_model_len": 512, "block_size": 16})
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_response_format_json_schema(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=40, temperature=0,
                                           response_format=RESPONSE_FORMAT)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_openai_response_format_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=40, temperature=0.7,
                                            seed=3, response_format=RESPONSE_FORMAT, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_malformed_schema_is_a_400_naming_the_problem(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "city"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=bad)  # type: ignore[arg-type]
    body = info.value.response.json()
    assert body["field"] == "response_format.json_schema.schema"
    assert "required" in body["error"] and "'city' is not of type 'array'" in body["error"]


def test_tgi_grammar_and_lmi_guided_choice(server: LiveServer) -> None:
    with server.client() as http:
        tgi = http.post("/generate", json={"inputs": "My phone number is", "parameters": {
            "max_new_tokens": 12, "grammar": {"type": "regex", "value": r"\d{3}-\d{4}"}}})
        lmi = http.post("/invocations", json={"inputs": "Is Paris in France? Answer:", "parameters": {
            "max_new_tokens": 4, "guided_choice": ["yes", "no"]}})
    assert tgi.status_code == 200 and re.fullmatch(r"\d{3}-\d{4}", tgi.json()["generated_text"]), tgi.text
    assert lmi.status_code == 200 and lmi.json()["generated_text"] in ("yes", "no"), lmi.text


def test_completions_guided_regex_through_the_openai_client(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL_NAME, prompt="The year the Eiffel Tower opened:", max_tokens=8,
                                      temperature=0, extra_body={"guided_regex": "1[0-9]{3}"})
    assert re.fullmatch("1[0-9]{3}", reply.choices[0].text)
