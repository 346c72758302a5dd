"""How one request wants its tokens chosen and when it wants them to stop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmserve.engine.structured_spec import StructuredOutputs
from lmserve.errors import InvalidRequestError

_MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    The default is greedy decoding (``temperature=0``) of up to 128 new tokens. ``top_k=0`` and
    ``top_p=1`` switch those filters off. ``seed`` makes a sampled request reproducible whatever else
    shares its batch. ``logprobs=None`` returns no log-probabilities, ``0`` the chosen token's only,
    ``n`` the chosen token's plus the ``n`` most likely alternatives. ``structured`` constrains the
    output to a JSON schema, regex, choice or grammar (see ``StructuredOutputs``).
    ``presence_penalty``, ``frequency_penalty`` (each in [-2, 2], over generated tokens) and
    ``logit_bias`` (token id -> bias in [-100, 100]; a dict is accepted) follow OpenAI's API.
    ``prompt_logprobs`` scores the prompt's tokens as ``logprobs`` scores the output's (the prompt
    is then computed in full, never taken from the prefix cache).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    min_new_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutputs | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples so params can be shared safely.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias or ()
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise InvalidRequestError(name, message)

        check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens",
              f"must be an integer >= 1, got {self.max_new_tokens!r}")
        check(_is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
              "min_new_tokens", f"must be an integer in [0, max_new_tokens], got {self.min_new_tokens!r}")
        check(_is_num(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature",
              f"must be a number in [0, 100], got {self.temperature!r}")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k",
              f"must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p",
              f"must be a number in (0, 1], got {self.top_p!r}")
        check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0.0, "repetition_penalty",
              f"must be a number > 0, got {self.repetition_penalty!r}")
        check(self.seed is None or _is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be a list of non-empty strings")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "must be a list of non-negative integers")
        check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= _MAX_LOGPROBS),
              "logprobs", f"must be an integer in [0, {_MAX_LOGPROBS}], got {self.logprobs!r}")
        check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and
                                               0 <= self.prompt_logprobs <= _MAX_LOGPROBS),
              "prompt_logprobs", f"must be an integer in [0, {_MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(_is_num(value) and -2.0 <= value <= 2.0, name, f"must be a number in [-2, 2], got {value!r}")
        for token, bias in self.logit_bias:
            check(_is_int(token) and token >= 0, "logit_bias", f"token ids must be integers >= 0, got {token!r}")
            check(_is_num(bias) and -100.0 <= bias <= 100.0, "logit_bias",
                  f"biases must be numbers in [-100, 100], got {bias!r} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


__all__ = ["SamplingParams"]
