"""Tool calls out of a model's answer, in the format each model family was trained to write.

| parser | the model writes | families (``model_type``) |
|---|---|---|
| ``hermes`` | ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, once per call | Qwen, Hermes |
| ``llama3_json`` | ``{"name": ..., "parameters": {...}}`` as the whole answer (``; `` between calls) | Llama 3 |
| ``mistral`` | ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` | Mistral, Mixtral |

``option.tool_call_parser`` picks one; unset, ``FAMILY_PARSERS`` picks by the checkpoint's
``model_type`` (``hermes`` for families not listed). ``tool_choice`` required and named answers are
constrained JSON and parsed by ``RequiredParser`` and ``NamedParser``.

Each parser also says from where a partial answer must be held back while streaming
(``hold_from``: the start of a call, or of text that may still become one; used by
``lmserve.server.tools.stream``), so no piece of a call is ever sent as content, and how a call is
written back into a conversation for a chat template that knows no tools (``render``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmserve.config.values import TOOL_CALL_PARSERS

FAMILY_PARSERS = {"llama": "llama3_json", "qwen2": "hermes", "qwen2_moe": "hermes", "qwen3": "hermes",
                  "qwen3_moe": "hermes", "mistral": "mistral", "mixtral": "mistral"}  # fmt: skip
DEFAULT_PARSER = "hermes"


@dataclass(frozen=True)
class ToolCall:
    """One call: ``arguments`` is JSON text, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip
        return out if index is None else {"index": index} | out


Parsed = tuple[str, list[ToolCall]]  # the answer's text outside calls, and the calls


class ToolParser:
    """A model family's tool-call format. ``parse`` never raises: an answer that does not hold a
    well-formed call is plain content."""

    name = ""
    marker = ""  # the text that opens a call
    needs_special_tokens = False  # the marker is a special token, dropped unless the answer keeps them

    def parse(self, text: str) -> Parsed:
        raise NotImplementedError

    def hold_from(self, text: str) -> int:
        """Where, in a partial answer, the text that may belong to a call begins (``len(text)``: nowhere)."""
        at = text.find(self.marker)
        if at >= 0:
            return at
        for k in range(min(len(self.marker) - 1, len(text)), 0, -1):  # a marker cut by the chunk boundary
            if self.marker.startswith(text[-k:]):
                return len(text) - k
        return len(text)

    def render(self, calls: Sequence[ToolCall]) -> str:
        """``calls`` as this model writes them (for a template that knows no tool calls)."""
        raise NotImplementedError

    def instructions(self) -> str:
        """How to call a function, for the system prompt of a template that knows no tools."""
        example = self.render([ToolCall("function_name", '{"argument": "value"}', "")])
        return f"To call a function, answer with exactly:\n{example}"


def _call(obj: object, args_key: str = "arguments") -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as JSON text already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


class HermesParser(ToolParser):
    name, marker = "hermes", "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> Parsed:
        calls = [_call(_loads(m.group(1).strip())) for m in self._BLOCK.finditer(text)]
        if not calls or any(c is None for c in calls):
            return text, []
        return self._BLOCK.sub("", text).strip(), [c for c in calls if c is not None]

    def render(self, calls: Sequence[ToolCall]) -> str:
        return "\n".join(f'<tool_call>\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n</tool_call>'
                         for c in calls)  # fmt: skip


class MistralParser(ToolParser):
    name, marker, needs_special_tokens = "mistral", "[TOOL_CALLS]", True

    def parse(self, text: str) -> Parsed:
        before, found, after = text.partition(self.marker)
        if not found:
            return text, []
        try:
            value, _ = json.JSONDecoder().raw_decode(after.strip())
        except ValueError:
            return text, []
        calls = [_call(v) for v in (value if isinstance(value, list) else [value])]
        if not calls or any(c is None for c in calls):
            return text, []
        return before.strip(), [c for c in calls if c is not None]

    def render(self, calls: Sequence[ToolCall]) -> str:
        items = ", ".join(f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls)
        return f"{self.marker} [{items}]"


class Llama3JsonParser(ToolParser):
    """The whole answer is the call(s); ``<|python_tag|>`` may precede them when special tokens are kept."""

    name, marker = "llama3_json", "{"
    _TAG = "<|python_tag|>"

    def parse(self, text: str) -> Parsed:
        body = text.strip().removeprefix(self._TAG).strip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                value, end = decoder.raw_decode(body, at)
            except ValueError:
                return text, []
            call = _call(value, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in "; \n\t":
                at += 1
        return "", calls

    def hold_from(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith("{") or self._TAG.startswith(head[:len(self._TAG)]):
            return 0  # the answer may still be a call: it is one only if it starts as one
        return len(text)

    def render(self, calls: Sequence[ToolCall]) -> str:
        return "; ".join(f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls)


class RequiredParser(ToolParser):
    """``tool_choice: required``: the answer is a constrained JSON list of ``{"name", "arguments"}``."""

    name = "required"

    def parse(self, text: str) -> Parsed:
        value = _loads(text)
        calls = [_call(v) for v in value] if isinstance(value, list) else []
        if not calls or any(c is None for c in calls):
            return text, []
        return "", [c for c in calls if c is not None]

    def hold_from(self, text: str) -> int:
        return 0


class NamedParser(ToolParser):
    """A named ``tool_choice``: the answer is the constrained arguments of that function."""

    def __init__(self, function: str) -> None:
        self.function = function

    def parse(self, text: str) -> Parsed:
        args = _loads(text)
        if not isinstance(args, dict):
            return text, []
        return "", [ToolCall(self.function, json.dumps(args, ensure_ascii=False))]

    def hold_from(self, text: str) -> int:
        return 0


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
assert set(PARSERS) == set(TOOL_CALL_PARSERS), "the config key's choices are the parsers built here"


def parser_for(configured: str | None, model_type: str | None) -> ToolParser:
    """The configured parser, else the model family's, else ``hermes``."""
    return PARSERS[configured or FAMILY_PARSERS.get(model_type or "", DEFAULT_PARSER)]()
