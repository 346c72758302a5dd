"""Text Generation Inference: ``POST /generate``, ``POST /generate_stream``, ``POST /``, ``GET /info``.

``/`` is what ``huggingface_hub.InferenceClient(base_url).text_generation`` posts to: it streams
when ``stream`` is true and otherwise answers like ``/generate`` (as a one-element list, as TGI).
Streams are Server-Sent Events ``data: {"index", "token": {"id", "text", "logprob", "special"},
"generated_text": null | str, "details": null | {...}}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lmserve import __version__
from lmserve.errors import EngineDeadError
from lmserve.server import generation as gen
from lmserve.server.errors import sse_error_event
from lmserve.server.params import TGI_DEFAULT_MAX_NEW_TOKENS, lmi_sampling_params
from lmserve.server.prompts import NewTokens, fit, prompt_ids
from lmserve.server.protocol.lmi import CompatGenerateRequest, GenerateRequest, GenerationParameters
from lmserve.server.routes import runtime_of
from lmserve.server.runtime import ModelRuntime
from lmserve.server.streaming import (
    TokenEvent,
    deltas_from,
    guarded,
    sse_data,
    sse_response,
    tgi_finish_reason,
    token_events,
    token_text,
)

router = APIRouter(tags=["TGI"])


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, model_name: str | None = None) -> Response:
    """Generate text for one input (TGI schema); ``?model_name=`` picks the model."""
    return JSONResponse(await _generate(runtime_of(request, model_name), request, body))


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request, model_name: str | None = None) -> Response:
    """Generate text for one input, streaming tokens as Server-Sent Events."""
    return await _stream(runtime_of(request, model_name), request, body)


@router.post("/")
async def compat_generate(body: CompatGenerateRequest, request: Request, model_name: str | None = None) -> Response:
    """TGI's compatibility route: streams when ``stream`` is true, else a one-element list."""
    rt = runtime_of(request, model_name)
    if body.stream:
        return await _stream(rt, request, body)
    return JSONResponse([await _generate(rt, request, body)])


@router.get("/info")
async def info(request: Request, model_name: str | None = None) -> dict[str, Any]:
    """The model and its limits, as TGI describes them."""
    rt = runtime_of(request, model_name)
    model = rt.model_info
    if model is None:
        raise EngineDeadError("the model is still loading" if rt.error is None else f"the model failed: {rt.error}")
    return {
        "model_id": rt.name, "model_sha": None, "model_dtype": model.dtype, "model_device_type": model.device,
        "model_pipeline_tag": "text-generation", "max_concurrent_requests": rt.config.workers.job_queue_size,
        "max_best_of": 1, "max_stop_sequences": None, "max_input_tokens": model.max_model_len - 1,
        "max_total_tokens": model.max_model_len, "validation_workers": 1, "max_client_batch_size": 1,
        "router": "lmserve", "version": __version__, "sha": None, "docker_label": None,
    }  # fmt: skip


async def _start(rt: ModelRuntime, body: GenerateRequest) -> gen.TrackedStream:
    rt.ready_router()
    new = NewTokens("parameters.max_new_tokens", body.parameters.max_new_tokens, TGI_DEFAULT_MAX_NEW_TOKENS)
    params = lmi_sampling_params(body.parameters, max_new_tokens=new.initial, logprobs=True)
    [(ids, sized)] = fit(rt, [await prompt_ids(rt, body.inputs, "inputs", body.parameters.truncate)], params, new)
    return gen.start(rt, ids, sized, "tgi")


def _token(rt: ModelRuntime, token_id: int, logprob: float | None, special: set[int] | frozenset[int],
           text: str | None = None) -> dict[str, Any]:
    return {"id": token_id, "text": token_text(rt, token_id) if text is None else text,
            "logprob": logprob, "special": token_id in special}  # fmt: skip


async def _generate(rt: ModelRuntime, request: Request, body: GenerateRequest) -> dict[str, Any]:
    p = body.parameters
    [c] = await gen.complete(request, [await _start(rt, body)])
    out: dict[str, Any] = {"generated_text": body.inputs + c.text if p.return_full_text else c.text}
    if p.details:
        special = rt.tokenizer.all_special_ids if rt.tokenizer else frozenset()
        logprobs = c.logprobs if len(c.logprobs) == len(c.token_ids) else [None] * len(c.token_ids)
        out["details"] = {
            "finish_reason": tgi_finish_reason(c.finish_reason, c.stop_reason),
            "generated_tokens": len(c.token_ids), "seed": p.seed, "prefill": [],
            "tokens": [_token(rt, t, lp.logprob if lp else None, special) for t, lp in zip(c.token_ids, logprobs, strict=True)],
            "top_tokens": [[_token(rt, t, v, special) for t, v in lp.top] for lp in logprobs if lp]
            if p.top_n_tokens else None,
        }  # fmt: skip
    return out


async def _stream(rt: ModelRuntime, request: Request, body: GenerateRequest) -> Response:
    stream = await _start(rt, body)
    first = await gen.first_delta(request, stream)
    return sse_response(guarded(_events(rt, body, stream, first), sse_error_event, [stream]), [stream])


async def _events(rt: ModelRuntime, body: GenerateRequest, stream: gen.TrackedStream,
                  first: Any) -> AsyncIterator[str]:
    p: GenerationParameters = body.parameters
    generated, index, count = body.inputs if p.return_full_text else "", 0, 0
    special = rt.tokenizer.all_special_ids if rt.tokenizer else frozenset()
    async for delta in deltas_from(first, stream):
        generated += delta.text
        count += len(delta.token_ids)
        events = token_events(rt, delta) or ([TokenEvent(0, "", 0.0, (), True)] if delta.finished else [])
        for k, event in enumerate(events):
            index += 1
            last = delta.finished and k == len(events) - 1
            payload: dict[str, Any] = {
                "index": index, "token": _token(rt, event.id, event.logprob or 0.0, special, event.text),
                "top_tokens": [_token(rt, t, v, special) for t, v in event.top] if p.top_n_tokens else None,
                "generated_text": generated if last else None,
                "details": {"finish_reason": tgi_finish_reason(delta.finish_reason, delta.stop_reason),
                            "generated_tokens": count,
                            "input_length": len(stream.prompt_ids), "seed": p.seed} if last else None,
            }  # fmt: skip
            yield sse_data(payload)
