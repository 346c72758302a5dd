"""The HTTP dialects ``lmserve bench`` speaks: how to ask for a stream and how to read one.

Each dialect builds a request body from a ``Prompt`` and turns each line of the response into a
``Chunk``: the tokens it carried (when the dialect says), the server's own token counts (OpenAI
``usage``, TGI/LMI ``details``) and any error event. Nothing here times anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmserve.bench import BenchUsageError


@dataclass(frozen=True)
class Prompt:
    """One request of a dataset: its text, how many tokens to ask for, its length when known."""

    text: str
    output_len: int
    prompt_tokens: int | None = None


@dataclass(frozen=True)
class Chunk:
    """What one response line said: whether it carried generated text (``tokens``: how many tokens,
    when the dialect says), the server's token counts, an error, whether it ends the answer."""

    carries: bool = False
    tokens: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens the server took from its prefix cache (OpenAI usage)
    error: str | None = None
    final: bool = False  # the line that ends the answer (TGI/LMI ``generated_text``)
    empty: bool = False  # a token event whose text is empty (e.g. the end-of-sequence token)


class Dialect:
    """Base class: ``path``, ``body()`` and ``parse()`` of one line (``None`` for lines to skip)."""

    name = ""
    path = ""
    sse = True

    def body(self, prompt: Prompt, model: str | None, ignore_eos: bool, temperature: float = 0.0) -> dict[str, Any]:
        """The request body; ``temperature`` 0 asks for greedy decoding."""
        raise NotImplementedError

    def parse(self, line: bytes | str) -> Chunk | None:
        raw = line.encode() if isinstance(line, str) else line
        if self.sse:
            if not raw.startswith(b"data:"):
                return None
            raw = raw[5:].strip()
            if raw == b"[DONE]":
                return None
        if not raw.strip():
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            return Chunk(error=f"unreadable line: {raw[:200]!r}")
        if isinstance(data, dict) and "error" in data:
            return Chunk(error=str(data["error"])[:500])
        return self.read(data)

    def read(self, data: Any) -> Chunk | None:
        raise NotImplementedError


class OpenAICompletions(Dialect):
    name, path = "openai", "/v1/completions"

    def body(self, prompt: Prompt, model: str | None, ignore_eos: bool, temperature: float = 0.0) -> dict[str, Any]:
        body = {"prompt": prompt.text, "max_tokens": prompt.output_len, "temperature": temperature, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}  # fmt: skip
        return body | ({"model": model} if model else {})

    def text_of(self, choice: dict[str, Any]) -> str:
        return str(choice.get("text") or "")

    def read(self, data: Any) -> Chunk | None:
        usage = data.get("usage") or {}
        choices = data.get("choices") or []
        # A chunk with empty text (the finish_reason chunk, or text still held back) carries no token
        # a user could see, so it does not count as the first token nor as an inter-token gap.
        has_text = any(self.text_of(c) for c in choices)
        if not has_text and not usage:
            return None
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return Chunk(carries=has_text, prompt_tokens=usage.get("prompt_tokens"),
                     output_tokens=usage.get("completion_tokens"), cached_tokens=cached)  # fmt: skip


class OpenAIChat(OpenAICompletions):
    name, path = "openai-chat", "/v1/chat/completions"

    def body(self, prompt: Prompt, model: str | None, ignore_eos: bool, temperature: float = 0.0) -> dict[str, Any]:
        body = {"messages": [{"role": "user", "content": prompt.text}], "max_tokens": prompt.output_len,
                "temperature": temperature, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": ignore_eos}  # fmt: skip
        return body | ({"model": model} if model else {})

    def text_of(self, choice: dict[str, Any]) -> str:
        return str((choice.get("delta") or {}).get("content") or "")


class _TokenPerEvent(Dialect):
    """TGI and LMI stream one token per event; the last one carries ``generated_text``."""

    def read(self, data: Any) -> Chunk | None:
        details = data.get("details") or {}
        final = data.get("generated_text") is not None
        token = data.get("token")
        return Chunk(carries=bool(token), tokens=1 if token else None, output_tokens=details.get("generated_tokens"),
                     prompt_tokens=details.get("input_length"), final=final,
                     empty=bool(token) and not token.get("text"))  # fmt: skip


def _sampling(temperature: float) -> dict[str, Any]:
    """TGI and LMI decode greedily unless ``do_sample`` is set."""
    return {"do_sample": True, "temperature": temperature} if temperature > 0 else {}


class TGI(_TokenPerEvent):
    name, path = "tgi", "/generate_stream"

    def body(self, prompt: Prompt, model: str | None, ignore_eos: bool, temperature: float = 0.0) -> dict[str, Any]:
        return {"inputs": prompt.text, "parameters": {"max_new_tokens": prompt.output_len, "details": True,
                                                      "ignore_eos": ignore_eos, **_sampling(temperature)}}  # fmt: skip


class LMI(_TokenPerEvent):
    name, path, sse = "lmi", "/invocations", False

    def body(self, prompt: Prompt, model: str | None, ignore_eos: bool, temperature: float = 0.0) -> dict[str, Any]:
        return {"inputs": prompt.text, "stream": True,
                "parameters": {"max_new_tokens": prompt.output_len, "details": True, "ignore_eos": ignore_eos,
                               **_sampling(temperature)}}  # fmt: skip


DIALECTS: dict[str, type[Dialect]] = {d.name: d for d in (OpenAICompletions, OpenAIChat, TGI, LMI)}


def dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]()
    except KeyError:
        raise BenchUsageError(f"--api: {name!r} is not one of {', '.join(DIALECTS)}") from None
