"""How ``Predictor`` turns data into a request body and a response body back into data, with the
names users of the SageMaker Python SDK know (``JSONSerializer``, ``JSONDeserializer``, ...).

A serializer has ``content_type`` and ``serialize(data) -> bytes``; a deserializer has ``accept``
and ``deserialize(body: bytes, content_type: str)``. Any object with those works.
"""

from __future__ import annotations

import json
from typing import Any, Protocol


class Serializer(Protocol):
    content_type: str

    def serialize(self, data: Any) -> bytes: ...


class Deserializer(Protocol):
    accept: str

    def deserialize(self, body: bytes, content_type: str) -> Any: ...


class JSONSerializer:
    """Any JSON-serialisable value (a dict, a list, a string) as ``application/json``; bytes and
    strings that are already JSON documents pass through unchanged."""

    content_type = "application/json"

    def serialize(self, data: Any) -> bytes:
        if isinstance(data, bytes | bytearray):
            return bytes(data)
        return json.dumps(data).encode()


class IdentitySerializer:
    """Bytes as they are, under a content type of your choice."""

    def __init__(self, content_type: str = "application/octet-stream") -> None:
        self.content_type = content_type

    def serialize(self, data: Any) -> bytes:
        return data.encode() if isinstance(data, str) else bytes(data)


class JSONDeserializer:
    """The body parsed as JSON; a JSON-lines body (a streamed answer) becomes a list of objects."""

    accept = "application/json"

    def deserialize(self, body: bytes, content_type: str) -> Any:
        if "jsonlines" in content_type:
            return [json.loads(line) for line in body.splitlines() if line.strip()]
        return json.loads(body)


class StringDeserializer:
    """The body decoded as UTF-8 text."""

    accept = "*/*"

    def deserialize(self, body: bytes, content_type: str) -> str:
        return body.decode()


class BytesDeserializer:
    """The body as raw bytes."""

    accept = "*/*"

    def deserialize(self, body: bytes, content_type: str) -> bytes:
        return body
