"""What a handler returned, turned into one answer per request of its batch (or stream pieces).

Accepted returns, for a batch of ``n`` requests:
- an ``Output``: for ``n == 1`` it is the answer; for ``n > 1`` each request's content is what was
  added with its ``batch_index`` (``Output.add(..., batch_index=i)``), and a request without any is
  a contract error. ``Output.error(...)`` (a code >= 400 without batch content) fails the batch.
- a list of ``n`` values (``Output``, or plain values as below), one per request, in order;
- for ``n == 1``, a plain value: ``bytes``, ``str``, or anything JSON can encode.
Anything else, or a list of the wrong length, is a ``HandlerContractError`` naming what was wrong.
"""

from __future__ import annotations

import json
from typing import Any

from lmserve.handlers.io import Output, has_batch_keys, split_batch_keys, to_json
from lmserve.handlers.messages import ItemOutput

JSON, JSONLINES, TEXT, BYTES = "application/json", "application/jsonlines", "text/plain; charset=utf-8", \
    "application/octet-stream"  # fmt: skip


class HandlerContractError(Exception):
    """The handler returned something that does not answer its batch."""


def answers(result: Any, n: int) -> list[ItemOutput]:
    """One ``ItemOutput`` per request (see the module docstring)."""
    if isinstance(result, list | tuple) and (n > 1 or result and all(isinstance(r, Output) for r in result)):
        if len(result) != n:
            raise HandlerContractError(f"handle() returned {len(result)} output(s) for a batch of {n} request(s); "
                                       "return one per request, in order")  # fmt: skip
        return [answers(r, 1)[0] for r in result]
    if isinstance(result, Output):
        return _split(result, n)
    if result is None:
        raise HandlerContractError("handle() returned None for a request; return an Output (or a value)")
    if n > 1:
        raise HandlerContractError(f"handle() returned one {type(result).__name__} for a batch of {n} requests; "
                                   "add each answer with batch_index=i or return a list of outputs")  # fmt: skip
    body, content_type = encode_value(result)
    return [ItemOutput(200, "OK", {"content-type": content_type}, body)]


def _split(output: Output, n: int) -> list[ItemOutput]:
    batched = has_batch_keys(output.content)
    if n > 1 and not batched:
        if output.code >= 400:  # Output.error(...): the whole batch failed
            return [_item(output.code, output.message, output.properties, output.content)] * n
        raise HandlerContractError(f"handle() answered a batch of {n} requests with one Output without "
                                   "batch_index; add each answer with batch_index=i")  # fmt: skip
    contents = split_batch_keys(output.content, n) if batched else [output.content]
    properties = split_batch_keys(output.properties, n) if batched else [output.properties]
    missing = [i for i, content in enumerate(contents) if not content]
    if missing and output.code < 400:
        raise HandlerContractError(f"handle() returned no output for request(s) {missing} of a batch of {n}")
    return [_item(output.code, output.message, props, content) for props, content in zip(properties, contents, strict=True)]


def _item(code: int, message: str, properties: dict[str, str], content: dict[str, Any]) -> ItemOutput:
    props = {k.lower() if k.lower() == "content-type" else k: str(v) for k, v in properties.items()}
    value = content.get("data", next(iter(content.values()), b""))
    if "content-type" in props and isinstance(value, bytes):  # typed by the handler: nothing to guess
        return ItemOutput(code, message, props, value)
    body, guessed = encode_value(value)
    props.setdefault("content-type", guessed)
    return ItemOutput(code, message, props, body)


def encode_value(value: Any) -> tuple[bytes, str]:
    """``value`` as a body and the content type it suggests."""
    if isinstance(value, bytes | bytearray):
        body = bytes(value)
        try:
            json.loads(body)
            return body, JSON
        except ValueError:
            try:
                body.decode("utf-8")
                return body, TEXT
            except UnicodeDecodeError:
                return body, BYTES
    if isinstance(value, str):
        return value.encode("utf-8"), TEXT
    return to_json(value), JSON


def piece(value: Any) -> tuple[bytes | None, str]:
    """One streamed value as bytes: JSON values become JSON lines, text and bytes pass as they are."""
    if value is None:
        return None, TEXT
    if isinstance(value, Output):
        value = value.content.get("data", next(iter(value.content.values()), b""))
    if isinstance(value, bytes | bytearray):
        return bytes(value), BYTES
    if isinstance(value, str):
        return value.encode("utf-8"), TEXT
    return (json.dumps(value) + "\n").encode("utf-8"), JSONLINES


def pieces(value: Any, n: int) -> tuple[list[bytes | None], str]:
    """One streamed step for a batch of ``n``: for ``n > 1`` a list of ``n`` values is required."""
    if n == 1:
        data, content_type = piece(value)
        return [data], content_type
    if not isinstance(value, list | tuple) or len(value) != n:
        raise HandlerContractError(f"a streaming handler must yield a list of {n} values (one per request of the "
                                   f"batch), got {type(value).__name__}")  # fmt: skip
    encoded = [piece(v) for v in value]
    kinds = {content_type for data, content_type in encoded if data is not None}
    return [data for data, _ in encoded], kinds.pop() if len(kinds) == 1 else BYTES
