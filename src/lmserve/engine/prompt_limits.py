"""What fits in a model's context: the one place prompts and new-token limits are checked.

The engine (``LLMEngine.add_request``) and every HTTP route check prompts through these functions,
so a prompt is refused for the same reason, in the same words, wherever it arrives.

``max_model_len`` counts prompt and generated tokens together. A prompt must leave room for one new
token. A request's ``max_new_tokens`` may not exceed ``max_model_len`` at all; one that does not fit
beside its prompt is refused (``error``, the default) or shortened to the room left (``clamp``).

Before a text is tokenized, its length in characters is checked against ``MAX_CHARS_PER_TOKEN``
characters per context token: tokenizing costs memory in proportion to the text (ids, offsets and
pieces per token), so a text that could never fit is refused without that cost. Real text runs
3 to 5 characters per token; 32 leaves room for long runs of spaces or symbols that tokenizers
merge into single tokens, so no prompt that would fit is refused by this bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from lmserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from lmserve.engine.sampling_params import SamplingParams

MAX_CHARS_PER_TOKEN = 32
MaxTokensPolicy = Literal["error", "clamp"]


def max_prompt_chars(max_model_len: int) -> int:
    """The longest text (in characters) that is tokenized for a model of this context length."""
    return MAX_CHARS_PER_TOKEN * max_model_len


def check_prompt_chars(field: str, chars: int, max_model_len: int) -> None:
    """Refuse a text of ``chars`` characters that cannot fit in the context, before tokenizing it."""
    limit = max_prompt_chars(max_model_len)
    if chars > limit:
        raise InvalidRequestError(
            field, f"has {chars} characters, more than the {limit} allowed before tokenizing "
                   f"(max_model_len {max_model_len} tokens x {MAX_CHARS_PER_TOKEN} characters per token)")


def check_prompt_ids(field: str, ids: Sequence[int], max_model_len: int, vocab_size: int) -> None:
    """Refuse a prompt that is empty, holds an id outside the vocabulary, or leaves no room for one
    new token."""
    if not ids:
        raise InvalidRequestError(field, "must not be empty")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(field, f"token id {bad} is outside the vocabulary: token ids must be in "
                                         f"[0, {vocab_size})")  # fmt: skip
    if len(ids) >= max_model_len:
        raise InvalidRequestError(field, f"the prompt has {len(ids)} tokens, but at most {max_model_len - 1} fit "
                                         f"(max_model_len {max_model_len} leaves room for one new token)")  # fmt: skip


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """Refuse a ``logit_bias`` that names a token id outside the vocabulary (the engine and the
    routes check it alike, like prompt ids)."""
    bad = next((t for t, _ in params.logit_bias if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("logit_bias", f"token id {bad} is outside the vocabulary: token ids must be in "
                                                f"[0, {vocab_size})")  # fmt: skip


def fit_new_tokens(field: str, requested: int | None, default: int | None, prompt_tokens: int,
                   max_model_len: int, policy: MaxTokensPolicy = "error") -> int:
    """The number of new tokens a request may generate after a prompt of ``prompt_tokens`` (which
    ``check_prompt_ids`` accepted). ``requested`` is what the client sent under the name ``field``
    (None when omitted); an omitted limit is ``default`` (None: the rest of the context), shortened
    to the room left. A requested limit beyond ``max_model_len`` is always refused; one beyond the
    room left is refused, or shortened with ``policy="clamp"``."""
    room = max_model_len - prompt_tokens
    if requested is None:
        return room if default is None else min(default, room)
    if requested > max_model_len:
        raise InvalidRequestError(field, f"is {requested}, more than max_model_len {max_model_len} "
                                         "(prompt and new tokens together)")  # fmt: skip
    if requested <= room or policy == "clamp":
        return min(requested, room)
    raise InvalidRequestError(
        field, f"is {requested}, but the prompt has {prompt_tokens} tokens and max_model_len is {max_model_len}: "
               f"at most {room} new tokens fit (option.max_tokens_policy=clamp shortens it instead)")
