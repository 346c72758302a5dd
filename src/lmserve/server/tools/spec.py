"""A chat request's ``tools`` and ``tool_choice``, checked, and the constraint that enforces a choice.

``tool_choice`` (OpenAI's values):

- ``none``: the tools are shown to the model (through the chat template) but no call is parsed;
- ``auto`` (the default when tools are given): the model decides; its answer is parsed for calls in
  its own format (``lmserve.server.tools.parsers``); needs ``option.enable_auto_tool_choice``;
- ``required``: the answer is constrained to a JSON list of calls ``[{"name", "arguments"}]`` (one
  item unless ``parallel_tool_calls``), each item an ``anyOf`` branch per tool whose name is an enum
  of one and whose arguments follow that tool's parameters schema;
- ``{"type": "function", "function": {"name": ...}}``: the answer is constrained to that function's
  arguments (its parameters schema), and the call's name is the one asked for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lmserve.engine.structured_spec import StructuredOutputs
from lmserve.errors import InvalidRequestError

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names
_ANY_OBJECT: dict[str, Any] = {"type": "object"}

Mode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class Tool:
    """One function a model may call: ``parameters`` is its JSON schema (an object)."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The tool as OpenAI (and chat templates) spell it."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """What the request asks of the model: ``mode``, and ``name`` for a named function."""

    mode: Mode
    name: str | None = None


def parse_tools(raw: Sequence[dict[str, Any]] | None) -> list[Tool]:
    """``tools`` as ``Tool``s; a malformed entry is a 400 naming it."""
    tools: list[Tool] = []
    for i, entry in enumerate(raw or ()):
        field = f"tools[{i}]"
        if entry.get("type") != "function" or not isinstance(entry.get("function"), dict):
            raise InvalidRequestError(field, "must be {\"type\": \"function\", \"function\": {...}}")
        fn = entry["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"{field}.function.name",
                                      f"must be 1-64 letters, digits, '_', '.' or '-', got {str(name)[:80]!r}")
        if any(t.name == name for t in tools):
            raise InvalidRequestError(f"{field}.function.name", f"{name!r} is given twice")
        params = fn.get("parameters", _ANY_OBJECT)
        if not isinstance(params, dict):
            raise InvalidRequestError(f"{field}.function.parameters", "must be a JSON schema object")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(f"{field}.function.description", "must be a string")
        tools.append(Tool(name, description, params))
    return tools


def parse_tool_choice(raw: str | dict[str, Any] | None, tools: Sequence[Tool]) -> ToolChoice:
    """``tool_choice`` checked against ``tools`` (OpenAI's default: ``auto`` with tools, else ``none``)."""
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise InvalidRequestError("tool_choice", f"must be none, auto, required or a named function, got "
                                                     f"{raw[:40]!r}")  # fmt: skip
        if raw != "none" and not tools:
            raise InvalidRequestError("tool_choice", f"{raw!r} needs tools")
        return ToolChoice(raw)  # type: ignore[arg-type]
    fn = raw.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if raw.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequestError("tool_choice", "a named choice must be {\"type\": \"function\", \"function\": "
                                                 "{\"name\": ...}}")  # fmt: skip
    if not any(t.name == name for t in tools):
        known = ", ".join(t.name for t in tools) or "none given"
        raise InvalidRequestError("tool_choice.function.name", f"{name[:64]!r} is not one of the tools ({known})")
    return ToolChoice("named", name)


def constraint(tools: Sequence[Tool], choice: ToolChoice, parallel: bool) -> StructuredOutputs | None:
    """The structured-output constraint that enforces ``choice`` (None for none and auto)."""
    if choice.mode == "named":
        tool = next(t for t in tools if t.name == choice.name)
        return StructuredOutputs(json=json.dumps(tool.parameters))
    if choice.mode != "required":
        return None
    # "name" first: a grammar keeps the schema's property order, and the model should pick the
    # function before writing its arguments.
    calls = [{"type": "object", "properties": {"name": {"enum": [t.name]}, "arguments": t.parameters},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}  # fmt: skip
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputs(json=json.dumps(schema))
