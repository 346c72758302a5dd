"""OpenAI ``POST /v1/chat/completions``: the model's chat template, then completion.

Streams are SSE chunks: a first ``delta`` with the role per choice, then content deltas, the last
with its ``finish_reason``; a ``usage`` chunk when ``stream_options.include_usage``; ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lmserve.engine.outputs import RequestDelta, TokenLogprob
from lmserve.errors import InvalidRequestError
from lmserve.server import generation as gen
from lmserve.server.errors import sse_error_event
from lmserve.server.params import check_text, openai_sampling_params
from lmserve.server.prompts import NewTokens, chat_prompt_ids, fit
from lmserve.server.protocol.openai import ChatCompletionRequest, ChatMessage
from lmserve.server.routes import runtime_of
from lmserve.server.routes.openai_common import envelope, fan_out, openai_finish_reason, usage, usage_of
from lmserve.server.runtime import ModelRuntime
from lmserve.server.streaming import guarded, merged, sse_data, sse_response, token_text

router = APIRouter(tags=["OpenAI"])
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, model_name: str | None = None) -> Response:
    """Answer a conversation with ``n`` choices."""
    rt = runtime_of(request, body.model or model_name)
    rt.ready_router()
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs", "needs logprobs=true")
    assert rt.tokenizer is not None and rt.model_info is not None
    prompt = await chat_prompt_ids(rt, _messages(body.messages))
    # Without a limit the answer may fill the context (default None), as OpenAI's chat API.
    new = NewTokens("max_completion_tokens", body.max_completion_tokens, None) \
        if body.max_completion_tokens is not None else NewTokens("max_tokens", body.max_tokens, None)  # fmt: skip
    params = openai_sampling_params(body, max_new_tokens=new.initial,
                                    logprobs=(body.top_logprobs or 0) if body.logprobs else None)  # fmt: skip
    streams = gen.start_all(rt, fan_out(fit(rt, [prompt], params, new), body.n), "chatcmpl")
    if body.stream:
        firsts = await gen.first_deltas(request, streams)
        chunks = _chunks(rt, body, prompt, streams, firsts)
        return sse_response(guarded(chunks, sse_error_event, streams), streams)
    results = await gen.complete(request, streams)
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": _logprobs(rt, c.logprobs) if body.logprobs else None,
                "finish_reason": openai_finish_reason(c.finish_reason)} for i, c in enumerate(results)]  # fmt: skip
    out = envelope("chat.completion", rt.name, "chatcmpl") | {"choices": choices,
                                                             "usage": usage_of([prompt], results)}  # fmt: skip
    return JSONResponse(out)


def _messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: text content only, parts joined, known roles only
    (``developer`` is OpenAI's newer name for ``system``, which is what templates know)."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got "
                                      f"{m.role[:40]!r} (tool messages need tool calling, which is not supported)")
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(part.text for part in m.content)  # fmt: skip
        message: dict[str, Any] = {"role": CHAT_ROLES[m.role],
                                   "content": check_text(f"messages[{i}].content", content or "")}  # fmt: skip
        if m.name is not None:
            message["name"] = check_text(f"messages[{i}].name", m.name)
        out.append(message)
    return out


def _logprobs(rt: ModelRuntime, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = token_text(rt, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}  # fmt: skip


async def _chunks(rt: ModelRuntime, body: ChatCompletionRequest, prompt: list[int],
                  streams: Sequence[gen.TrackedStream], firsts: list[RequestDelta]) -> AsyncIterator[str]:
    head = envelope("chat.completion.chunk", rt.name, "chatcmpl")
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    extra = {"usage": None} if include_usage else {}
    for i in range(len(streams)):
        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield sse_data(head | {"choices": [role]} | extra)
    generated = 0
    async for index, delta in merged(firsts, streams):
        generated += len(delta.token_ids)
        choice = {"index": index, "delta": {"content": delta.text} if delta.text else {},
                  "logprobs": _logprobs(rt, delta.logprobs or []) if body.logprobs else None,
                  "finish_reason": openai_finish_reason(delta.finish_reason)}  # fmt: skip
        yield sse_data(head | {"choices": [choice]} | extra)
    if include_usage:
        yield sse_data(head | {"choices": [], "usage": usage(len(prompt), generated)})
    yield sse_data("[DONE]")
