"""OpenAI ``POST /v1/completions`` (SSE when ``stream``; ends with ``data: [DONE]``).

``best_of`` runs that many requests per prompt and answers with the ``n`` of highest cumulative
log-probability (not with ``stream``, as in OpenAI's API); ``echo`` puts the prompt text before each
choice's text (in the first chunk when streaming), and with ``logprobs`` the prompt tokens' too (the
first one has none, as in OpenAI's API).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lmserve.engine.outputs import RequestDelta, TokenLogprob
from lmserve.errors import InvalidRequestError
from lmserve.server import generation as gen
from lmserve.server.errors import openai_sse_error_event
from lmserve.server.params import OPENAI_COMPLETION_DEFAULT_MAX_TOKENS, openai_sampling_params
from lmserve.server.prompts import NewTokens, check_prompt, fit, prompt_ids
from lmserve.server.protocol.openai import CompletionRequest
from lmserve.server.routes import runtime_of
from lmserve.server.routes.openai_common import envelope, fan_out, openai_finish_reason, usage, usage_of
from lmserve.server.runtime import ModelRuntime
from lmserve.server.streaming import guarded, merged, sse_data, sse_response, token_text

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, model_name: str | None = None) -> Response:
    """Complete one prompt or a batch of prompts (text or token ids), ``n`` choices each."""
    rt = runtime_of(request, body.model or model_name)
    rt.ready_router()
    prompts = await _prompts(rt, body.prompt)
    new = NewTokens("max_tokens", body.max_tokens, OPENAI_COMPLETION_DEFAULT_MAX_TOKENS)
    best_of = _best_of(body)
    # Ranking needs each choice's cumulative log-probability: ask for the chosen token's at least.
    logprobs = body.logprobs if body.logprobs is not None or best_of == body.n else 0
    assert rt.model_info is not None
    params = openai_sampling_params(body, max_new_tokens=new.initial, logprobs=logprobs,
                                    vocab_size=rt.model_info.vocab_size)  # fmt: skip
    echoes = _echoes(rt, body.prompt, prompts) if body.echo else [""] * len(prompts)
    streams = gen.start_all(rt, fan_out(fit(rt, prompts, params, new), best_of), "cmpl")
    if body.stream:
        firsts = await gen.first_deltas(request, streams)
        chunks = _chunks(rt, body, prompts, streams, firsts, [e for e in echoes for _ in range(body.n)])
        return sse_response(guarded(chunks, openai_sse_error_event, streams), streams)
    results = await gen.complete(request, streams)
    chosen = [(p, c) for p in range(len(prompts)) for c in _best(results[p * best_of:(p + 1) * best_of], body.n)]
    choices = [{"index": i, "text": echoes[p] + c.text, "finish_reason": openai_finish_reason(c.finish_reason),
                "logprobs": _logprobs(rt, c.logprobs, len(echoes[p]), prompts[p] if body.echo else None,
                                      c.prompt_logprobs) if body.logprobs is not None else None}
               for i, (p, c) in enumerate(chosen)]  # fmt: skip
    out = envelope("text_completion", rt.name, "cmpl") | {"choices": choices, "usage": usage_of(prompts, results)}
    return JSONResponse(out)


def _best_of(body: CompletionRequest) -> int:
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise InvalidRequestError("best_of", f"must be >= n ({body.n}), got {best_of}")
    if body.stream and best_of > body.n:
        raise InvalidRequestError("best_of", "cannot be used with stream (the best choices are known only at the end)")
    return best_of


def _best(results: Sequence[gen.Completion], n: int) -> list[gen.Completion]:
    """The ``n`` results of highest cumulative log-probability (all of them, in order, when n are asked)."""
    if len(results) == n:
        return list(results)
    return sorted(results, key=lambda c: sum(lp.logprob for lp in c.logprobs), reverse=True)[:n]


def _echoes(rt: ModelRuntime, prompt: str | list[str] | list[int] | list[list[int]],
            ids: list[list[int]]) -> list[str]:
    """Each prompt as text: as sent, or its token ids decoded."""
    assert rt.tokenizer is not None
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return [str(p) for p in prompt]
    return [rt.tokenizer.decode(p) for p in ids]


async def _prompts(rt: ModelRuntime, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await prompt_ids(rt, prompt, "prompt")]
    if not prompt:
        raise InvalidRequestError("prompt", "must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [check_prompt(rt, list(prompt), "prompt")]  # type: ignore[arg-type]
    out = []
    for i, p in enumerate(prompt):
        field = f"prompt[{i}]"
        if isinstance(p, str):
            out.append(await prompt_ids(rt, p, field))
        elif isinstance(p, list):
            out.append(check_prompt(rt, [int(t) for t in p], field))
        else:  # the schema allows no mix of ids and prompts: say so rather than guess
            raise InvalidRequestError(field, "must be a text or a list of token ids, like the other prompts")
    return out


def _logprobs(rt: ModelRuntime, logprobs: Sequence[TokenLogprob], offset: int, prompt: list[int] | None = None,
              prompt_logprobs: Sequence[TokenLogprob] | None = None) -> dict[str, Any]:
    """OpenAI's legacy logprobs of the generated tokens (text from ``offset``), after the echoed
    ``prompt``'s when given."""
    tokens = [token_text(rt, lp.token_id) for lp in logprobs]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    out: dict[str, Any] = {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                           "top_logprobs": [{token_text(rt, t): v for t, v in lp.top} for lp in logprobs],
                           "text_offset": offsets}  # fmt: skip
    if prompt is None:
        return out
    scored = list(prompt_logprobs or ())
    texts = [token_text(rt, t) for t in prompt]
    starts = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts + tokens, "token_logprobs": [None, *(lp.logprob for lp in scored)] + out["token_logprobs"],
            "top_logprobs": [None, *({token_text(rt, t): v for t, v in lp.top} for lp in scored)] + out["top_logprobs"],
            "text_offset": starts + offsets}  # fmt: skip


async def _chunks(rt: ModelRuntime, body: CompletionRequest, prompts: list[list[int]],
                  streams: Sequence[gen.TrackedStream], firsts: list[RequestDelta],
                  echoes: list[str]) -> AsyncIterator[str]:
    head = envelope("text_completion", rt.name, "cmpl")
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats
    prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, however many choices
    generated, offsets, cached = 0, [len(e) for e in echoes], [0] * len(prompts)
    async for index, delta in merged(firsts, streams):
        generated += len(delta.token_ids)
        if index % body.n == 0:  # a prompt's cached tokens: those of its first choice
            cached[index // body.n] = delta.num_cached_tokens
        echo, echoes[index] = echoes[index], ""
        prompt = prompts[index // body.n] if body.echo and echo else None
        logprobs = _logprobs(rt, delta.logprobs or [], offsets[index], prompt, delta.prompt_logprobs) \
            if body.logprobs is not None else None  # fmt: skip
        offsets[index] += len(delta.text)
        choice = {"index": index, "text": echo + delta.text, "logprobs": logprobs,
                  "finish_reason": openai_finish_reason(delta.finish_reason)}  # fmt: skip
        so_far = {"usage": usage(prompt_tokens, generated, sum(cached)) if continuous else None}
        yield sse_data(head | {"choices": [choice]} | (so_far if include_usage or continuous else {}))
    if include_usage:
        yield sse_data(head | {"choices": [], "usage": usage(prompt_tokens, generated, sum(cached))})
    yield sse_data("[DONE]")
