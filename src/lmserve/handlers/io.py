"""``Input`` and ``Output``: what a handler's ``handle(inputs)`` receives and returns.

The contract is the one custom ``model.py`` scripts for the managed LMI/DJL containers already use
(``from djl_python import Input, Output`` works unchanged, see the top-level ``djl_python`` shim):

- The first call is the initialisation: ``inputs.is_empty()`` is true and ``get_properties()`` holds
  every property of the model (its ``serving.properties`` without the ``option.`` prefix, plus
  ``model_dir``, ``batch_size`` and ``max_batch_delay``). Its return value is ignored.
- Then each call gets one batch. With ``batch_size`` 1 (or when one request arrived alone) ``inputs``
  is the request itself; otherwise ``is_batch()`` is true and ``get_batches()`` lists one ``Input``
  per request, in arrival order.
- The answer is an ``Output``. For a batch, content added with ``batch_index=i`` answers request
  ``i`` (``Output.add(..., batch_index=i)``), or the handler returns a list of ``Output``, one per
  request. A handler may also return a generator (or async generator) to stream its answer.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import orjson

_BATCH_KEY = re.compile(r"batch_(\d+)_(.*)")
_JSON = "application/json"


def batch_key(key: str, batch_index: int | None) -> str:
    """The content or property key for request ``batch_index`` of a batch (DJL's spelling)."""
    return key if batch_index is None else f"batch_{batch_index:03d}_{key}"


class Input:
    """One request (properties, i.e. HTTP headers and the like, plus content), or a batch of them."""

    def __init__(self, properties: dict[str, str] | None = None, content: dict[str, bytes] | None = None,
                 batch: list[Input] | None = None) -> None:  # fmt: skip
        self.properties: dict[str, str] = dict(properties or {})
        self.content: dict[str, bytes] = dict(content or {})
        self._batch = batch
        if batch is not None:
            self.properties["batch_size"] = str(len(batch))
            if batch:  # a batch reads like its first request, as DJL's batched Input does
                self.content = {batch_key(k, i): v for i, item in enumerate(batch) for k, v in item.content.items()}
                self.content |= batch[0].content

    # ---- batches ---------------------------------------------------------------------------------

    def is_batch(self) -> bool:
        return self.get_batch_size() > 1

    def get_batch_size(self) -> int:
        return len(self._batch) if self._batch is not None else 1

    def get_batches(self) -> list[Input]:
        """One ``Input`` per request of the batch, in arrival order (``[self]`` for one request)."""
        return list(self._batch) if self._batch is not None else [self]

    # ---- properties ------------------------------------------------------------------------------

    def is_empty(self) -> bool:
        """True for the initialisation call, which carries properties and no content."""
        return not self.content and self._batch is None

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        """A property by name; HTTP header names match in any case."""
        if key in self.properties:
            return self.properties[key]
        return next((v for k, v in self.properties.items() if k.lower() == key.lower()), None)

    def get_request_id(self) -> str | None:
        return self.get_property("request_id")

    def get_content_type(self, key: str | None = None) -> str | None:
        return self.get_property("content-type")

    # ---- content ---------------------------------------------------------------------------------

    def contains_key(self, key: str) -> bool:
        return key in self.content

    def get_as_bytes(self, key: str | None = None) -> bytes:
        """The content under ``key`` (default: ``data``, else the only or first entry)."""
        if key is not None:
            if key not in self.content:
                raise KeyError(f"the input has no content named {key!r}; it has {sorted(self.content)}")
            return self.content[key]
        if "data" in self.content:
            return self.content["data"]
        return next(iter(self.content.values()), b"")

    def get_as_string(self, key: str | None = None) -> str:
        return self.get_as_bytes(key).decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        return json.loads(self.get_as_bytes(key))

    def get_as_numpy(self, key: str | None = None) -> Any:
        """Content written by ``numpy.save`` (``.npy``), or a list of arrays for ``.npz``."""
        import numpy as np

        loaded = np.load(io.BytesIO(self.get_as_bytes(key)), allow_pickle=False)
        if hasattr(loaded, "files"):
            return [loaded[name] for name in loaded.files]
        return loaded

    def get_data(self, key: str | None = None) -> Any:
        """The content decoded by its ``Content-Type``: JSON, text, numpy (``tensor/npz``,
        ``application/x-npy``), else bytes. A body that is not declared decodes as JSON if it parses."""
        kind = (self.get_content_type() or "").split(";")[0].strip().lower()
        if kind == _JSON or kind.endswith("+json"):
            return self.get_as_json(key)
        if kind.startswith("text/"):
            return self.get_as_string(key)
        if kind in ("tensor/npz", "tensor/ndlist", "application/x-npy", "application/x-npz"):
            return self.get_as_numpy(key)
        if not kind:
            try:
                return self.get_as_json(key)
            except ValueError:
                return self.get_as_bytes(key)
        return self.get_as_bytes(key)

    def __repr__(self) -> str:
        return f"Input(batch_size={self.get_batch_size()}, properties={self.properties!r}, content_keys={list(self.content)})"


class Output:
    """A handler's answer: status code and message, properties (HTTP headers) and content."""

    def __init__(self, code: int = 200, message: str = "OK") -> None:
        self.code, self.message = code, message
        self.properties: dict[str, str] = {}
        self.content: dict[str, Any] = {}
        self.stream: Iterator[Any] | None = None

    def set_code(self, code: int) -> Output:
        self.code = code
        return self

    def set_message(self, message: str) -> Output:
        self.message = message
        return self

    def error(self, error: str, code: int = 424, message: str = "prediction failure") -> Output:
        """Fail the whole batch: status ``code`` (424 by default) with ``error`` as the reason."""
        self.code, self.message = code, message
        self.properties["content-type"] = _JSON
        self.content = {"data": json.dumps({"error": error, "code": code}).encode()}
        return self

    def add_property(self, key: str, value: str, batch_index: int | None = None) -> Output:
        self.properties[batch_key(key, batch_index)] = value
        return self

    def add(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        """Add content (``bytes``, ``str`` as UTF-8, anything else as JSON) for the request, or for
        request ``batch_index`` of a batch."""
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif isinstance(value, bytearray):
            value = bytes(value)
        self.content[batch_key(key or "data", batch_index)] = value
        return self

    def add_as_string(self, value: str, key: str | None = None, batch_index: int | None = None) -> Output:
        return self.add(value, key, batch_index)

    def add_as_json(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        self.add_property("content-type", _JSON, batch_index)
        return self.add(to_json(value), key, batch_index)

    def add_as_numpy(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        self.add_property("content-type", "application/x-npy", batch_index)
        return self.add(buffer.getvalue(), key, batch_index)

    def add_stream_content(self, stream: Iterator[Any], output_formatter: Any = None) -> Output:
        """Stream ``stream``'s items as the answer (DJL's streaming API)."""
        self.stream = stream
        return self

    def __repr__(self) -> str:
        return f"Output(code={self.code}, message={self.message!r}, content_keys={list(self.content)})"


def to_json(value: Any) -> bytes:
    """``value`` as JSON: orjson where it takes the value (an order of magnitude faster than ``json``
    on the float lists embedding handlers answer; numpy arrays and scalars too, a float32 array in the
    shortest text that reads back as the same float32, about half the bytes of its values widened to
    Python floats), else ``json.dumps`` (integers past 64 bits, say)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value).encode("utf-8")


def split_batch_keys(mapping: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """``{"batch_001_data": x, "data": y}`` -> one dict per request: keys without a batch prefix
    apply to every request, prefixed ones to their own (the prefix removed)."""
    shared = {k: v for k, v in mapping.items() if not _BATCH_KEY.fullmatch(k)}
    parts: list[dict[str, Any]] = [dict(shared) for _ in range(size)]
    for key, value in mapping.items():
        match = _BATCH_KEY.fullmatch(key)
        if match is not None and int(match.group(1)) < size:
            parts[int(match.group(1))][match.group(2)] = value
    return parts


def has_batch_keys(mapping: dict[str, Any]) -> bool:
    return any(_BATCH_KEY.fullmatch(k) for k in mapping)
