"""OpenAI ``POST /v1/completions`` (SSE when ``stream``; ends with ``data: [DONE]``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lmserve.engine.outputs import RequestDelta, TokenLogprob
from lmserve.errors import InvalidRequestError
from lmserve.server import generation as gen
from lmserve.server.errors import sse_error_event
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
    params = openai_sampling_params(body, max_new_tokens=new.initial, logprobs=body.logprobs)
    streams = gen.start_all(rt, fan_out(fit(rt, prompts, params, new), body.n), "cmpl")
    if body.stream:
        firsts = await gen.first_deltas(request, streams)
        chunks = _chunks(rt, body, prompts, streams, firsts)
        return sse_response(guarded(chunks, sse_error_event, streams), streams)
    results = await gen.complete(request, streams)
    choices = [{"index": i, "text": c.text, "logprobs": _logprobs(rt, c.logprobs, 0) if body.logprobs is not None
                else None, "finish_reason": openai_finish_reason(c.finish_reason)}
               for i, c in enumerate(results)]  # fmt: skip
    out = envelope("text_completion", rt.name, "cmpl") | {"choices": choices, "usage": usage_of(prompts, results)}
    return JSONResponse(out)


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


def _logprobs(rt: ModelRuntime, logprobs: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens = [token_text(rt, lp.token_id) for lp in logprobs]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(rt, t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}  # fmt: skip


async def _chunks(rt: ModelRuntime, body: CompletionRequest, prompts: list[list[int]],
                  streams: Sequence[gen.TrackedStream], firsts: list[RequestDelta]) -> AsyncIterator[str]:
    head = envelope("text_completion", rt.name, "cmpl")
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    generated, offsets = 0, [0] * len(streams)
    async for index, delta in merged(firsts, streams):
        generated += len(delta.token_ids)
        logprobs = _logprobs(rt, delta.logprobs or [], offsets[index]) if body.logprobs is not None else None
        offsets[index] += len(delta.text)
        choice = {"index": index, "text": delta.text, "logprobs": logprobs,
                  "finish_reason": openai_finish_reason(delta.finish_reason)}  # fmt: skip
        yield sse_data(head | {"choices": [choice]} | ({"usage": None} if include_usage else {}))
    if include_usage:
        prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, however many choices
        yield sse_data(head | {"choices": [], "usage": usage(prompt_tokens, generated)})
    yield sse_data("[DONE]")
