"""OpenAI ``POST /v1/embeddings``, answered by a model served by the default text-embedding handler.

The texts go through the model's dynamic batcher as one request ``{"inputs": [...]}``; the vectors
come back as lists of floats, or with ``encoding_format=base64`` as little-endian float32 bytes in
base64 (what the official client asks for by default and decodes). ``dimensions`` keeps the first
``dimensions`` components and normalises them again (as Matryoshka-trained models expect); it must
not exceed the model's own size.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lmserve.errors import HandlerError, InvalidRequestError
from lmserve.handlers.launcher import HandlerLauncher
from lmserve.handlers.messages import Item
from lmserve.server.protocol.openai import EmbeddingRequest
from lmserve.server.routes import runtime_of
from lmserve.server.routes.handler import json_answer
from lmserve.server.runtime import ModelRuntime

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, model_name: str | None = None) -> Response:
    """Embed one text or a list of texts."""
    rt = runtime_of(request, body.model or model_name)
    handler = _embedding_handler(rt)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or not all(isinstance(text, str) for text in texts):
        raise InvalidRequestError("input", "send a string or a non-empty list of strings (token ids are not accepted)")
    reply = await handler.infer(Item({"content-type": "application/json"}, {"data": json.dumps({"inputs": texts}).encode()}))
    vectors = json_answer(reply)
    if not isinstance(vectors, list) or len(vectors) != len(texts):
        raise HandlerError(f"the embedding handler answered {type(vectors).__name__} for {len(texts)} text(s)")
    assert reply.output is not None
    tokens = int(reply.output.properties.get("x-prompt-tokens", "0"))
    data = [{"object": "embedding", "index": i, "embedding": _encode(_cut(v, body.dimensions), body.encoding_format)}
            for i, v in enumerate(vectors)]  # fmt: skip
    return JSONResponse({"object": "list", "data": data, "model": rt.name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


def _embedding_handler(rt: ModelRuntime) -> HandlerLauncher:
    handler = rt.ready_handler()  # a loading or failed model says so (503)
    if handler is None or rt.handler_task != "text-embedding":
        raise InvalidRequestError("model", f"model '{rt.name}' is not an embedding model; serve an encoder "
                                  "checkpoint (or set option.task=text-embedding) for /v1/embeddings")  # fmt: skip
    return handler


def _cut(vector: list[float], dimensions: int | None) -> list[float]:
    if dimensions is None:
        return vector
    if dimensions > len(vector):
        raise InvalidRequestError("dimensions", f"{dimensions} is more than the model's {len(vector)} dimensions")
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
