"""A conversation with tools, as the model's chat template takes it.

A template that knows tools (its source uses a ``tools`` variable, as Hugging Face's tool-use
templates do) gets them natively: ``tools`` as a template variable, assistant turns with
``tool_calls`` (arguments as objects, as those templates expect) and ``tool`` turns with their
``tool_call_id`` and function ``name``.

A template that does not (SmolLM2's, for one) gets the documented fallback:

- the tools and how to call them (the parser's format, ``ToolParser.instructions``) in the system
  prompt: prepended to the first system message, or as a system message of their own;
- an assistant turn's calls written into its content as the model would write them
  (``ToolParser.render``);
- a ``tool`` turn as a ``user`` turn holding ``<tool_response>`` + the result + ``</tool_response>``
  (templates that know no tool role often refuse roles they do not know).

With ``tool_choice`` none the tools are not shown at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lmserve.errors import InvalidRequestError
from lmserve.server.params import check_text
from lmserve.server.protocol.openai import ChatMessage
from lmserve.server.tools.parsers import ToolCall, ToolParser
from lmserve.server.tools.spec import Tool

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SYSTEM_PROMPT = "You can call these functions:\n<tools>\n{tools}\n</tools>\n{how}"


def template_knows_tools(chat_template: object) -> bool:
    """Whether a chat template renders tools itself (a dict holds named templates)."""
    sources = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    return any(isinstance(src, str) and "tools" in src for src in sources)


def template_messages(messages: Sequence[ChatMessage], tools: Sequence[Tool], parser: ToolParser,
                      native: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages, and the extra template variables, for ``tok.apply_chat_template``."""
    names = {c.id: c.function.name for m in messages for c in m.tool_calls or ()}
    out = [_message(i, m, names, parser, native) for i, m in enumerate(messages)]
    if not tools:
        return out, {}
    if native:
        return out, {"tools": [t.as_openai() for t in tools]}
    listing = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    prompt = SYSTEM_PROMPT.format(tools=listing, how=parser.instructions())
    if out and out[0]["role"] == "system":
        out[0] = out[0] | {"content": f"{prompt}\n\n{out[0]['content']}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _message(i: int, m: ChatMessage, names: dict[str, str], parser: ToolParser, native: bool) -> dict[str, Any]:
    """One message as templates expect it: text content only, parts joined, known roles only
    (``developer`` is OpenAI's newer name for ``system``, which is what templates know)."""
    if m.role not in CHAT_ROLES:
        raise InvalidRequestError(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got "
                                                         f"{m.role[:40]!r}")  # fmt: skip
    content = m.content if isinstance(m.content, str) or m.content is None else \
        "".join(part.text for part in m.content)  # fmt: skip
    message: dict[str, Any] = {"role": CHAT_ROLES[m.role],
                               "content": check_text(f"messages[{i}].content", content or "")}  # fmt: skip
    if m.name is not None:
        message["name"] = check_text(f"messages[{i}].name", m.name)
    if m.tool_calls and m.role == "assistant":
        calls = [(c.id, c.function.name, _arguments(f"messages[{i}].tool_calls[{j}].function.arguments",
                                                    c.function.arguments)) for j, c in enumerate(m.tool_calls)]
        if native:
            message["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                                     for cid, name, args in calls]  # fmt: skip
        else:
            written = parser.render([ToolCall(name, json.dumps(args, ensure_ascii=False), cid)
                                     for cid, name, args in calls])  # fmt: skip
            message["content"] = f"{message['content']}\n{written}" if message["content"] else written
    elif m.tool_calls:
        raise InvalidRequestError(f"messages[{i}].tool_calls", "only assistant messages carry tool calls")
    if m.role == "tool":
        if m.tool_call_id is None:
            raise InvalidRequestError(f"messages[{i}].tool_call_id", "is required in a tool message")
        name = names.get(m.tool_call_id, m.name)
        if native:
            message |= {"tool_call_id": m.tool_call_id} | ({"name": name} if name else {})
        else:
            message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    return message


def _arguments(field: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidRequestError(field, f"must be JSON text, got {text[:60]!r}") from None
