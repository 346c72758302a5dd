"""OpenAI ``POST /v1/chat/completions``: the model's chat template, then completion.

Streams are SSE chunks: a first ``delta`` with the role per choice, then content deltas, the last
with its ``finish_reason``; a ``usage`` chunk when ``stream_options.include_usage``; ``data: [DONE]``.

With tools (``lmserve.server.tools``), an answer's calls become ``message.tool_calls`` and the finish
reason ``tool_calls``. Streamed, text that may belong to a call is held back; each call then comes
as one delta with its index, id and name (arguments empty), then its arguments
(``lmserve.server.tools.stream``).
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
from lmserve.server.params import openai_sampling_params
from lmserve.server.prompts import NewTokens, chat_prompt_ids, fit
from lmserve.server.protocol.openai import ChatCompletionRequest
from lmserve.server.routes import runtime_of
from lmserve.server.routes.openai_common import envelope, fan_out, openai_finish_reason, usage, usage_of
from lmserve.server.runtime import ModelRuntime
from lmserve.server.streaming import guarded, merged, sse_data, sse_response, token_text
from lmserve.server.tools import ToolPlan, ToolStream, plan_tools

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, model_name: str | None = None) -> Response:
    """Answer a conversation with ``n`` choices."""
    rt = runtime_of(request, body.model or model_name)
    rt.ready_router()
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs", "needs logprobs=true")
    assert rt.tokenizer is not None and rt.model_info is not None
    plan = plan_tools(rt, body)
    prompt = await chat_prompt_ids(rt, plan.messages, **plan.template_vars)
    # Without a limit the answer may fill the context (default None), as OpenAI's chat API.
    new = NewTokens("max_completion_tokens", body.max_completion_tokens, None) \
        if body.max_completion_tokens is not None else NewTokens("max_tokens", body.max_tokens, None)  # fmt: skip
    params = plan.apply(openai_sampling_params(body, max_new_tokens=new.initial, vocab_size=rt.model_info.vocab_size,
                                               logprobs=(body.top_logprobs or 0) if body.logprobs else None))
    streams = gen.start_all(rt, fan_out(fit(rt, [prompt], params, new), body.n), "chatcmpl")
    if body.stream:
        firsts = await gen.first_deltas(request, streams)
        chunks = _chunks(rt, body, plan, prompt, streams, firsts)
        return sse_response(guarded(chunks, openai_sse_error_event, streams), streams)
    results = await gen.complete(request, streams)
    choices = [_choice(rt, body, plan, i, c) for i, c in enumerate(results)]
    out = envelope("chat.completion", rt.name, "chatcmpl") | {"choices": choices,
                                                             "usage": usage_of([prompt], results)}  # fmt: skip
    return JSONResponse(out)


def _choice(rt: ModelRuntime, body: ChatCompletionRequest, plan: ToolPlan, index: int,
            c: gen.Completion) -> dict[str, Any]:
    content, calls = plan.parser.parse(c.text) if plan.parser else (c.text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message = {"role": "assistant", "content": content or None, "tool_calls": [t.as_openai() for t in calls]}
    return {"index": index, "message": message, "logprobs": _logprobs(rt, c.logprobs) if body.logprobs else None,
            "finish_reason": _finish_reason(c.finish_reason, bool(calls))}


def _finish_reason(finish_reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish_reason is not None else openai_finish_reason(finish_reason)


def _logprobs(rt: ModelRuntime, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = token_text(rt, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}  # fmt: skip


async def _chunks(rt: ModelRuntime, body: ChatCompletionRequest, plan: ToolPlan, prompt: list[int],
                  streams: Sequence[gen.TrackedStream], firsts: list[RequestDelta]) -> AsyncIterator[str]:
    head = envelope("chat.completion.chunk", rt.name, "chatcmpl")
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats
    extra = {"usage": usage(len(prompt), 0) if continuous else None} if include_usage or continuous else {}
    for i in range(len(streams)):
        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield sse_data(head | {"choices": [role]} | extra)
    generated, cached = 0, 0
    held = [ToolStream(plan.parser) if plan.parser else None for _ in streams]
    async for index, delta in merged(firsts, streams):
        generated += len(delta.token_ids)
        if index == 0:  # the prompt's cached tokens: those of its first choice
            cached = delta.num_cached_tokens
        if continuous:
            extra = {"usage": usage(len(prompt), generated, cached)}
        tool_stream, called = held[index], False
        pieces = tool_stream.feed(delta.text) if tool_stream else [{"content": delta.text}] if delta.text else []
        if tool_stream and delta.finished:
            rest, called = tool_stream.finish()
            pieces += rest
        if called or not pieces:
            pieces.append({})  # the finish reason of a call comes in a chunk of its own, as OpenAI's
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            choice = {"index": index, "delta": piece,
                      "logprobs": _logprobs(rt, delta.logprobs or []) if body.logprobs and k == 0 else None,
                      "finish_reason": _finish_reason(delta.finish_reason, called) if last else None}  # fmt: skip
            yield sse_data(head | {"choices": [choice]} | extra)
    if include_usage:
        yield sse_data(head | {"choices": [], "usage": usage(len(prompt), generated, cached)})
    yield sse_data("[DONE]")
