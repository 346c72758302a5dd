"""``Predictor`` and ``AsyncPredictor``: call a running lmserve endpoint, by the name the SDK recorded
when it deployed it, or by URL for any lmserve (``make serve``, a container, another host).

``predict(data)`` posts to ``/invocations`` through the serializer and deserializer (JSON both ways
by default); ``predict_stream(data)`` asks for a streamed answer and yields each token's text as it
arrives; ``delete_endpoint()`` stops an endpoint the SDK started and frees its port.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from lmserve.errors import LMServeError
from lmserve.sdk import endpoints
from lmserve.sdk.serializers import Deserializer, JSONDeserializer, JSONSerializer, Serializer


class PredictionError(LMServeError):
    """The endpoint answered with an error: ``status`` and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the endpoint answered {status}: {message}")
        self.status = status


def _resolve(endpoint: str) -> tuple[str, endpoints.EndpointRecord | None]:
    if endpoint.startswith(("http://", "https://")):
        url = endpoint.rstrip("/")
        return url, next((r for r in endpoints.list_endpoints() if r.url == url), None)
    record = endpoints.find(endpoint)
    return record.url, record


class _Base:
    def __init__(self, endpoint_name: str, serializer: Serializer | None = None,
                 deserializer: Deserializer | None = None, model_name: str | None = None,
                 timeout: float = 600.0) -> None:  # fmt: skip
        self.url, self.record = _resolve(endpoint_name)
        self.endpoint_name = self.record.name if self.record else endpoint_name
        self.serializer = serializer or JSONSerializer()
        self.deserializer = deserializer or JSONDeserializer()
        self.model_name = model_name
        self.timeout = timeout

    def _request(self, data: Any, stream: bool) -> dict[str, Any]:
        if stream:
            if not isinstance(data, dict):
                raise TypeError("predict_stream takes an LMI body, a dict like {'inputs': ..., 'parameters': {...}}")
            data = data | {"stream": True}
        headers = {"Content-Type": self.serializer.content_type, "Accept": self.deserializer.accept}
        params = {"model_name": self.model_name} if self.model_name else None
        return {"url": f"{self.url}/invocations", "content": self.serializer.serialize(data), "headers": headers,
                "params": params}  # fmt: skip

    def _answer(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise PredictionError(response.status_code, _message(response.content))
        return self.deserializer.deserialize(response.content, response.headers.get("content-type", ""))

    def _stop(self, grace_s: float) -> None:
        if self.record is None:
            raise endpoints.EndpointNotFoundError(f"{self.endpoint_name} was not started by the SDK on this machine: "
                                                  "stop it where it was started")  # fmt: skip
        endpoints.stop_process_group(self.record.pid, grace_s)
        endpoints.forget(self.record.name)


class Predictor(_Base):
    """See the module docstring."""

    def predict(self, data: Any) -> Any:
        with httpx.Client(timeout=self.timeout) as http:
            return self._answer(http.post(**self._request(data, stream=False)))

    def predict_stream(self, data: dict[str, Any]) -> Iterator[str]:
        """Each generated token's text as the server streams it."""
        with httpx.Client(timeout=self.timeout) as http, http.stream("POST", **self._request(data, True)) as response:
            if response.status_code >= 400:
                raise PredictionError(response.status_code, _message(response.read()))
            for line in response.iter_lines():
                yield from _token_texts(line)

    def delete_endpoint(self, grace_s: float = 15.0) -> None:
        """Stop the endpoint's server and every process it started; its port is free afterwards."""
        self._stop(grace_s)

    def delete_model(self) -> None:
        """Unregister the model from the endpoint's server (the server keeps running until
        ``delete_endpoint``)."""
        headers = {"Authorization": f"Bearer {self.record.api_key}"} if self.record and self.record.api_key else {}
        with httpx.Client(timeout=self.timeout) as http:
            self._answer_plain(http.delete(f"{self.url}/models/{self.model_name or self.endpoint_name}",
                                           headers=headers))  # fmt: skip

    @staticmethod
    def _answer_plain(response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise PredictionError(response.status_code, _message(response.content))


class AsyncPredictor(_Base):
    """``Predictor`` for asyncio code: ``await predict(data)``, ``async for text in predict_stream(data)``."""

    async def predict(self, data: Any) -> Any:
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            return self._answer(await http.post(**self._request(data, stream=False)))

    async def predict_stream(self, data: dict[str, Any]) -> AsyncIterator[str]:
        async with httpx.AsyncClient(timeout=self.timeout) as http, \
                http.stream("POST", **self._request(data, True)) as response:  # fmt: skip
            if response.status_code >= 400:
                raise PredictionError(response.status_code, _message(await response.aread()))
            async for line in response.aiter_lines():
                for text in _token_texts(line):
                    yield text

    def delete_endpoint(self, grace_s: float = 15.0) -> None:
        self._stop(grace_s)


def _token_texts(line: str) -> Iterator[str]:
    """The token text of one JSON line of a streamed LMI answer; an error line raises."""
    if not line.strip():
        return
    event = json.loads(line)
    if "error" in event and "token" not in event:
        raise PredictionError(int(event.get("code", 500)), str(event["error"]))
    token = event.get("token")
    if token and token.get("text"):
        yield token["text"]


def _message(body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]
    return str(parsed.get("error", parsed)) if isinstance(parsed, dict) else str(parsed)
