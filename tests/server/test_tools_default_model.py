"""Tool calling on the default model, end to end: required and named choices always give valid calls.

These need the engine's constrained decoding (``lmserve.engine.structured``); until that is in the
tree they are skipped, and they run as soon as it is.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from lmserve.server.runtime import DEFAULT_ENGINE_FACTORY
from tests.server.conftest import MODEL_NAME, LiveServer, start_server

HAS_CONSTRAINTS = importlib.util.find_spec("lmserve.engine.structured") is not None
pytestmark = [pytest.mark.default_model, pytest.mark.slow,
              pytest.mark.skipif(not HAS_CONSTRAINTS, reason="the engine has no constrained decoding yet")]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}  # fmt: skip
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}  # fmt: skip
TOOLS: list = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
               {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(default_model_dir: Path) -> Iterator[openai.OpenAI]:
    server: LiveServer = start_server(default_model_dir, engine_factory=DEFAULT_ENGINE_FACTORY,
                                      engine={"max_model_len": 1024, "block_size": 16, "kv_cache_tokens": 8192},
                                      model_loading_timeout_s=300, predict_timeout_s=120)  # fmt: skip
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    server.stop()


def check(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), {"get_weather": WEATHER, "get_time": TIME}[name])


@pytest.mark.parametrize("tool", ["get_weather", "get_time"])
def test_a_named_function_always_returns_a_valid_call(client: openai.OpenAI, tool: str) -> None:
    choice = {"type": "function", "function": {"name": tool}}
    out = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice=choice,
                                         max_tokens=40, temperature=0.8, n=2, seed=1)  # type: ignore[call-overload]
    for c in out.choices:
        [call] = c.message.tool_calls
        assert call.function.name == tool and c.finish_reason == "tool_calls"
        check(tool, call.function.arguments)


def test_required_streams_valid_calls(client: openai.OpenAI) -> None:
    chunks = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True)
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    assert list(calls) == [0]
    check(calls[0]["name"], calls[0]["arguments"])
