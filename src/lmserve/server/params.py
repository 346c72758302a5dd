"""Dialect parameters into ``SamplingParams``, with errors that name the parameter as the client sent it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import InvalidRequestError
from lmserve.server.protocol.lmi import GenerationParameters
from lmserve.server.protocol.openai import ChatCompletionRequest, CompletionRequest
from lmserve.server.structured import lmi_structured, openai_structured

LMI_DEFAULT_MAX_NEW_TOKENS = 30  # as LMI's rolling-batch handlers
TGI_DEFAULT_MAX_NEW_TOKENS = 100  # as TGI
OPENAI_COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy completions API
OPENAI_DEFAULT_TEMPERATURE = 1.0
log = logging.getLogger(__name__)

_LMI_NAMES = {"stop": "parameters.stop_sequences", "logprobs": "parameters.top_n_tokens"}
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop": "stop",
                 "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                 "repetition_penalty": "repetition_penalty", "logprobs": "logprobs",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "logit_bias": "logit_bias", "stop_token_ids": "stop_token_ids"}  # fmt: skip


def check_text(field: str, text: str) -> str:
    """``text`` itself, if it can be encoded (JSON allows lone surrogates; tokenizers do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(field, "is not valid Unicode (it holds a lone surrogate)") from None
    return text


def _build(names: Mapping[str, str], prefix: str, **kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        raise InvalidRequestError(names.get(exc.field, prefix + exc.field), exc.message) from None


def _refuse(checks: Iterable[tuple[bool, str, str]]) -> None:
    for bad, name, why in checks:
        if bad:
            raise InvalidRequestError(name, why)


def lmi_sampling_params(p: GenerationParameters, *, max_new_tokens: int, logprobs: bool) -> SamplingParams:
    """LMI/TGI parameters; ``logprobs`` asks for the chosen token's log-probability (details, streams).
    The caller works out ``max_new_tokens`` (the dialect's default when unset)."""
    _refuse([
        (p.decoder_input_details, "parameters.decoder_input_details", "prompt log-probabilities are not supported"),
        (p.best_of not in (None, 1), "parameters.best_of", "only best_of=1 is supported"),
        (p.typical_p is not None, "parameters.typical_p", "typical decoding is not supported"),
        (p.watermark, "parameters.watermark", "watermarking is not supported"),
        (p.adapter_id is not None, "parameters.adapter_id", "no adapters are loaded"),
    ])  # fmt: skip
    if p.do_sample is False:
        temperature = 0.0
    elif p.do_sample is True:
        temperature = 1.0 if p.temperature is None else p.temperature
    else:
        temperature = p.temperature or 0.0
    stop = [*(p.stop_sequences or ()), *([p.stop] if isinstance(p.stop, str) else p.stop or ())]
    for i, s in enumerate(stop):
        check_text(f"parameters.stop_sequences[{i}]", s)
    top_n = p.top_n_tokens or None
    return _build(
        _LMI_NAMES, "parameters.",
        max_new_tokens=max_new_tokens,
        min_new_tokens=p.min_new_tokens or 0, temperature=temperature, top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        seed=p.seed, stop=tuple(stop), ignore_eos=p.ignore_eos,
        frequency_penalty=p.frequency_penalty or 0.0,
        logprobs=top_n if top_n else (0 if logprobs or p.details else None), structured=lmi_structured(p),
    )  # fmt: skip


def logit_bias(bias: Mapping[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (token ids as JSON object keys) as ids, each checked against the vocabulary."""
    out = {}
    for key, value in (bias or {}).items():
        token = int(key) if key.strip().isdigit() else -1
        if not 0 <= token < vocab_size:
            raise InvalidRequestError("logit_bias", f"keys must be token ids in [0, {vocab_size}), got {key[:20]!r}")
        out[token] = value
    return out


def openai_sampling_params(req: CompletionRequest | ChatCompletionRequest, *, max_new_tokens: int,
                           logprobs: int | None, vocab_size: int) -> SamplingParams:
    """OpenAI sampling fields. The caller works out ``max_new_tokens`` (its default depends on the
    route and the prompt) and ``logprobs`` (the fields differ between completions and chat); tool
    fields are the chat route's (``lmserve.server.tools``)."""
    if isinstance(req, CompletionRequest):
        _refuse([(req.suffix is not None, "suffix", "insertion (suffix) is not supported")])
    if req.user is not None:  # accepted as OpenAI does; lmserve keeps no per-user state
        log.debug("request from user %r", req.user[:64])
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
    for i, s in enumerate(stop):
        check_text(f"stop[{i}]", s)
    return _build(
        _OPENAI_NAMES, "", max_new_tokens=max_new_tokens, min_new_tokens=req.min_tokens or 0,
        temperature=OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed, stop=tuple(stop), ignore_eos=req.ignore_eos, logprobs=logprobs,
        structured=openai_structured(req, req.response_format),
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=logit_bias(req.logit_bias, vocab_size), stop_token_ids=tuple(req.stop_token_ids or ()),
        prompt_logprobs=req.logprobs if isinstance(req, CompletionRequest) and req.echo else None,
    )  # fmt: skip
