"""The AWS event-stream framing that SageMaker Runtime's ``InvokeEndpointWithResponseStream`` sends.

One message is a prelude (total length, headers length, both 4-byte big-endian, and the prelude's
CRC32), the headers, the payload, and a CRC32 of everything before it. A header is its name's length
(1 byte), the name, a type tag (7: a string), the value's length (2 bytes) and the value. SDKs check
both CRCs, so a framing mistake fails loudly on the client.
"""

from __future__ import annotations

import struct
import zlib

_STRING = 7


def _headers(headers: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        out += struct.pack(">B", len(raw_name)) + raw_name
        out += struct.pack(">BH", _STRING, len(raw_value)) + raw_value
    return bytes(out)


def message(headers: dict[str, str], payload: bytes) -> bytes:
    """One framed event-stream message."""
    encoded = _headers(headers)
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return body + struct.pack(">I", zlib.crc32(body))


def payload_part(data: bytes) -> bytes:
    """A ``PayloadPart`` event carrying ``data`` (a piece of the model's own response bytes)."""
    return message({":event-type": "PayloadPart", ":content-type": "application/octet-stream",
                    ":message-type": "event"}, data)  # fmt: skip


def exception(code: str, payload: bytes) -> bytes:
    """A modelled exception event (``ModelStreamError``, ``InternalStreamFailure``) ending a stream."""
    return message({":exception-type": code, ":content-type": "application/json", ":message-type": "exception"},
                   payload)  # fmt: skip
