"""What the engine hands back: streamed deltas while a request runs, and its final result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ErrorKind = Literal["out_of_memory", "invalid_request", "internal"]  # why a request ended with finish_reason "error"


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token and, if asked, its most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestDelta:
    """What one engine step produced for one request.

    ``text`` never ends in half a multi-byte character: bytes are held back until complete.
    ``finish_reason`` is set on the last delta of a request: ``"stop"`` (end-of-sequence token, stop
    token or stop string), ``"length"`` (``max_new_tokens`` or the context limit), ``"abort"`` or
    ``"error"`` (then ``error`` says why, and ``error_kind`` what kind of failure it was, so the
    server can answer 507 for ``"out_of_memory"``, 400 for ``"invalid_request"`` (naming
    ``error_field``: a grammar the engine could not compile) and 500 for ``"internal"``).
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None
    error_field: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first delta, when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """The whole result of one request, as returned by ``LLM.generate``.

    A request that failed alone (``finish_reason == "error"``: a grammar that cannot be compiled, the
    cache too small for it) keeps its delta's ``error``, ``error_kind`` and ``error_field``, so a
    batch of prompts still returns every other result and says why this one has none.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt token i + 1's, when asked for
    error: str | None = None
    error_kind: ErrorKind | None = None
    error_field: str | None = None

    def add(self, delta: RequestDelta) -> None:
        """Fold one streamed delta into this result."""
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = list(delta.prompt_logprobs)
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(delta.logprobs)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.num_cached_tokens = delta.num_cached_tokens
            self.error, self.error_kind, self.error_field = delta.error, delta.error_kind, delta.error_field
