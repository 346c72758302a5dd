"""Token ids to text, a few tokens at a time, and stop strings found in that text.

Decoding token by token is wrong for byte-level and sentencepiece tokenizers: one character may span
tokens, and a token's leading space depends on its neighbours. So each step decodes a short window
(from ``prefix_offset``) twice, with and without the new tokens, and emits the difference, holding it
back while it ends in U+FFFD (an incomplete UTF-8 sequence). When stop strings are set, the last
``max(len(stop)) - 1`` characters are held back too, so text that becomes a stop string is never sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmserve.engine.tokenizer import Tokenizer

_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first outputs, for spacing


class IncrementalDetokenizer:
    """Per-request streaming detokenizer with stop-string detection."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._include_stop = include_stop_str_in_output
        self.text = ""  # all decoded output text (after stop-string truncation)
        self._sent = 0  # characters of ``text`` already handed out
        self.stop_string: str | None = None

    def add_tokens(self, token_ids: Sequence[int]) -> None:
        """Decode newly generated tokens into ``text``; sets ``stop_string`` if one appeared.
        Once a stop string is found the text is final and later tokens are ignored."""
        if self.stop_string is not None:
            return
        self._ids.extend(token_ids)
        decode = self._tok.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special)
        full_text = decode(self._ids[self._prefix_offset:], self._skip_special)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return  # nothing complete yet
        new_text = full_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        start = max(len(self.text) - self._hold, 0)
        self.text += new_text
        if self._stop and self.stop_string is None:
            self._find_stop(start)

    def flush(self) -> None:
        """At the end of a request, decode whatever is held back, even an incomplete character."""
        if self._read_offset >= len(self._ids) or self.stop_string is not None:
            return
        prefix_text = self._tok.decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special)
        full_text = self._tok.decode(self._ids[self._prefix_offset:], self._skip_special)
        self._prefix_offset = self._read_offset = len(self._ids)
        if len(full_text) > len(prefix_text):
            start = max(len(self.text) - self._hold, 0)
            self.text += full_text[len(prefix_text):]
            if self._stop:
                self._find_stop(start)

    def _find_stop(self, search_from: int) -> None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self.text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.text = self.text[:i + len(s)] if self._include_stop else self.text[:i]
            self.stop_string = s

    def take_new_text(self, finished: bool) -> str:
        """Text not yet handed out; while unfinished, keeps back a possible stop-string prefix."""
        end = len(self.text) if finished or self.stop_string is not None else len(self.text) - self._hold
        if end <= self._sent:
            return ""
        out = self.text[self._sent:end]
        self._sent = end
        return out
