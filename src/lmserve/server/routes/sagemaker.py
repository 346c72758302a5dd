"""SageMaker / DJL LMI: ``POST /invocations`` and ``POST /predictions/{model}``.

Body ``{"inputs": str | [str], "parameters": {...}, "stream": bool}``. Without streaming the answer is
``{"generated_text": ...}`` (a list of those for a list of inputs), with ``details`` when
``parameters.details`` is true. With streaming it is JSON lines (``application/jsonlines``): one
``{"token": {"id", "text", "log_prob"}, "generated_text": null}`` per token; the last line carries
``generated_text`` (and ``details`` when asked).

``option.output_formatter`` changes that shape: ``json`` streams one JSON document
(``{"generated_text": ...}``, written piece by piece), ``jsonlines`` answers a JSON line per input
without streaming, ``sse`` sends the lines as Server-Sent Events (``data: {...}``); the name of a
model.py function hands the answer to that function (``server/formatting.py``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pydantic
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic.json_schema import models_json_schema
from starlette.routing import Match, Route
from starlette.types import Scope

from lmserve.errors import InvalidRequestError
from lmserve.server import formatting
from lmserve.server import generation as gen
from lmserve.server.errors import jsonlines_error, sse_error_event
from lmserve.server.params import LMI_DEFAULT_MAX_NEW_TOKENS, lmi_sampling_params
from lmserve.server.prompts import NewTokens, fit, prompt_ids
from lmserve.server.protocol.lmi import GenerationParameters, InvocationRequest
from lmserve.server.routes import runtime_of
from lmserve.server.routes.handler import handler_response
from lmserve.server.runtime import ModelRuntime
from lmserve.server.streaming import (
    deltas_from,
    guarded,
    jsonlines_response,
    sse_data,
    sse_response,
    tgi_finish_reason,
    token_events,
    token_text,
)

router = APIRouter(tags=["SageMaker / LMI"])


# The body is read by hand: a model served by a handler takes any body (JSON, text, bytes); the
# text-generation schema is still published.
_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/InvocationRequest"}}}}}  # fmt: skip


def openapi_schemas() -> dict[str, Any]:
    """The body schemas these routes read by hand (``InvocationRequest`` and the models it uses),
    for the app's OpenAPI components."""
    _, defs = models_json_schema([(InvocationRequest, "validation")], ref_template="#/components/schemas/{model}")
    return dict(defs.get("$defs", {}))


# These two routes take a model's whole traffic, so they are served by plain routes that the app
# puts first in its table (``direct_routes``): FastAPI's routing and parameter solving cost about as
# much CPU a request as everything else the frontend does for an embedding request. The decorated
# twins below are never reached; they publish the routes in /openapi.json.
@router.post("/invocations", openapi_extra=_BODY)
async def invocations(request: Request, model_name: str | None = None) -> Response:
    """Generate text for one input or a list of inputs (LMI schema), or run the model's handler;
    ``?model_name=`` picks the model when several are loaded."""
    return await invoke_any(runtime_of(request, model_name), request)


@router.post("/predictions/{model_name}", openapi_extra=_BODY)
async def predictions(model_name: str, request: Request) -> Response:
    """``/invocations`` for a named model (DJL Serving); an unknown name is a 404."""
    return await invoke_any(runtime_of(request, model_name), request)


async def _direct_invocations(request: Request) -> Response:
    return await invoke_any(runtime_of(request, request.query_params.get("model_name")), request)


async def _direct_predictions(request: Request) -> Response:
    return await invoke_any(runtime_of(request, request.path_params["model_name"]), request)


class _DirectRoute(Route):
    """A plain route that names itself in the request scope, as FastAPI's routes do: the HTTP
    response metrics count by the matched route's template."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self
        return match, child


def direct_routes() -> list[Route]:
    """``/invocations`` and ``/predictions/{model_name}`` as plain routes, for the head of the app's
    route table (see above); errors go through the app's error table like any route's."""
    return [_DirectRoute("/invocations", _direct_invocations, methods=["POST"]),
            _DirectRoute("/predictions/{model_name}", _direct_predictions, methods=["POST"])]  # fmt: skip


async def invoke_any(rt: ModelRuntime, request: Request) -> Response:
    """The model's handler answers when it has one; else the LMI text-generation body is read."""
    handler = rt.ready_handler()
    if handler is not None:
        return await handler_response(handler, request)
    try:
        body = InvocationRequest.model_validate_json(await request.body())
    except pydantic.ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    return await invoke(rt, request, body)


async def invoke(rt: ModelRuntime, request: Request, body: InvocationRequest) -> Response:
    rt.ready_router()
    single = isinstance(body.inputs, str)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not texts:
        raise InvalidRequestError("inputs", "must not be an empty list")
    if body.stream and not single:
        raise InvalidRequestError("inputs", "streaming takes one input; send a string, not a list")
    new = NewTokens("parameters.max_new_tokens", body.parameters.max_new_tokens, LMI_DEFAULT_MAX_NEW_TOKENS)
    # A custom formatter sees each token's log-probability, streaming or not (as in the containers).
    params = lmi_sampling_params(body.parameters, max_new_tokens=new.initial,
                                 logprobs=body.stream or rt.output_formatter is not None)
    fields = ["inputs"] if single else [f"inputs[{i}]" for i in range(len(texts))]
    prompts = [await prompt_ids(rt, text, f, body.parameters.truncate) for text, f in zip(texts, fields, strict=True)]
    streams = gen.start_all(rt, fit(rt, prompts, params, new), "lmi")
    if rt.output_formatter is not None:
        parameters = body.parameters.model_dump(exclude_unset=True)
        views = [formatting.new_output(i, t, p, parameters) for i, (t, p) in enumerate(zip(texts, prompts, strict=True))]
        if body.stream:
            return await formatting.streamed(rt, request, rt.output_formatter, views[0], streams[0])
        return await formatting.whole(rt, request, rt.output_formatter, views, streams)
    formatter = rt.config.model.output_formatter
    if body.stream:
        first = await gen.first_delta(request, streams[0])
        lines = _lines(rt, body.parameters, texts[0], streams[0], first)
        if formatter == "sse":
            return sse_response(guarded(_events(lines), sse_error_event, streams), streams)
        if formatter == "json":
            prefix = texts[0] if body.parameters.return_full_text else ""
            document = _document(lines, prefix)
            return jsonlines_response(guarded(document, jsonlines_error, streams), streams, "application/json")
        return jsonlines_response(guarded(lines, jsonlines_error, streams), streams)
    results = await gen.complete(request, streams)
    outputs = [_output(rt, body.parameters, text, c) for text, c in zip(texts, results, strict=True)]
    if formatter == "jsonlines":
        return Response("".join(json.dumps(o) + "\n" for o in outputs), media_type="application/jsonlines")
    if formatter == "sse":
        return Response("".join(sse_data(o) for o in outputs), media_type="text/event-stream")
    return JSONResponse(outputs[0] if single else outputs)


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """``output_formatter=sse``: each JSON line as one Server-Sent Event."""
    async for line in lines:
        yield sse_data(line.rstrip("\n"))


async def _document(lines: AsyncIterator[str], prefix: str) -> AsyncIterator[str]:
    """``output_formatter=json`` while streaming: ``{"generated_text": "..."}`` written piece by
    piece as tokens come (``details`` at the end when asked), so the whole body is one JSON document."""
    yield '{"generated_text": "' + json.dumps(prefix)[1:-1]
    async for line in lines:
        event = json.loads(line)
        if event.get("token"):
            yield json.dumps(event["token"]["text"])[1:-1]
        if event.get("generated_text") is not None:
            details = event.get("details")
            yield '"' + (f', "details": {json.dumps(details)}' if details is not None else "") + "}"


def _details(text: str, finish: str | None, stop: Any, generated: int) -> dict[str, Any]:
    return {"finish_reason": tgi_finish_reason(finish, stop), "generated_tokens": generated, "inputs": text}


def _output(rt: ModelRuntime, p: GenerationParameters, text: str, c: gen.Completion) -> dict[str, Any]:
    out: dict[str, Any] = {"generated_text": text + c.text if p.return_full_text else c.text}
    if p.details:
        logprobs = [lp.logprob for lp in c.logprobs] if len(c.logprobs) == len(c.token_ids) else None
        out["details"] = _details(text, c.finish_reason, c.stop_reason, len(c.token_ids)) | {"tokens": [
            {"id": t, "text": token_text(rt, t), "log_prob": logprobs[k] if logprobs else None}
            for k, t in enumerate(c.token_ids)
        ]}  # fmt: skip
    return out


async def _lines(rt: ModelRuntime, p: GenerationParameters, text: str, stream: gen.TrackedStream,
                 first: Any) -> AsyncIterator[str]:
    generated, count = text if p.return_full_text else "", 0
    async for delta in deltas_from(first, stream):
        generated += delta.text
        count += len(delta.token_ids)
        events = token_events(rt, delta)
        for k, event in enumerate(events):
            line: dict[str, Any] = {"token": {"id": event.id, "text": event.text, "log_prob": event.logprob},
                                    "generated_text": None}  # fmt: skip
            if delta.finished and k == len(events) - 1:
                line["generated_text"] = generated
                if p.details:
                    line["details"] = _details(text, delta.finish_reason, delta.stop_reason, count)
            yield json.dumps(line) + "\n"
        if delta.finished and not events:
            line = {"token": None, "generated_text": generated}
            if p.details:
                line["details"] = _details(text, delta.finish_reason, delta.stop_reason, count)
            yield json.dumps(line) + "\n"
