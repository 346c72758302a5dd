"""A chat answer with tools, streamed as OpenAI's delta pieces.

Content is sent as it comes, except text that may belong to a call (``ToolParser.hold_from``),
which is held back until the answer ends and is then parsed. Each call is sent as OpenAI's clients
expect it: one piece with its index, id, type and name (arguments empty), then its arguments. For a
named ``tool_choice`` the whole answer is the arguments of a call known from the start, so its head
goes out with the first text and the arguments stream as they are generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmserve.server.tools.parsers import NamedParser, ToolCall, ToolParser

Piece = dict[str, Any]  # one choice's "delta" object


def call_pieces(calls: Sequence[ToolCall]) -> list[Piece]:
    """Each call as two pieces: index, id, type and name first, then the arguments."""
    out: list[Piece] = []
    for k, call in enumerate(calls):
        out.append({"tool_calls": [call.as_openai(k) | {"function": {"name": call.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
    return out


class ToolStream:
    """One choice's answer: ``feed`` each text delta, then ``finish``."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser, self.text, self.sent = parser, "", 0
        self._named = ToolCall(parser.function, "") if isinstance(parser, NamedParser) else None

    def feed(self, delta: str) -> list[Piece]:
        """The pieces that can be sent now."""
        self.text += delta
        if self._named is not None:
            return self._named_pieces(delta)
        hold = max(self.parser.hold_from(self.text), self.sent)
        out, self.sent = self.text[self.sent:hold], hold
        return [{"content": out}] if out else []

    def finish(self) -> tuple[list[Piece], bool]:
        """The pieces left at the end, and whether the answer held calls."""
        content, calls = self.parser.parse(self.text)
        if self._named is not None:
            return [], bool(calls)
        if not calls:
            rest = self.text[self.sent:]
            return ([{"content": rest}] if rest else []), False
        sent = self.text[:self.sent]
        rest = content[len(sent):] if content.startswith(sent) else ""
        return [*([{"content": rest}] if rest else []), *call_pieces(calls)], True

    def _named_pieces(self, delta: str) -> list[Piece]:
        assert self._named is not None
        out: list[Piece] = []
        if self.sent == 0:
            out.append(call_pieces([self._named])[0])
            self.sent = 1
        if delta:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
        return out
