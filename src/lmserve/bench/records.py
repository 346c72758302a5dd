"""What one benchmark request leaves behind: raw timings, token counts and how it ended.

Times are seconds on one monotonic clock (``time.perf_counter``) relative to the start of the run, so
records from one run can be compared and written out as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lmserve.bench.dialects import Chunk

# Error kinds that are not HTTP statuses. An HTTP error keeps its status code as its kind ("429").
TRANSPORT_ERROR = "transport"  # connection refused or reset, timeout: no HTTP status to report
STREAM_ERROR = "stream"  # an error event after the stream began (HTTP 200, then a failure)
EMPTY_STREAM = "empty"  # HTTP 200 but the stream carried no token at all


@dataclass
class RequestRecord:
    """One request: when it was sent, when each streamed chunk arrived, when it ended.

    ``chunk_tokens[i]`` is the number of tokens chunk ``i`` carried when the dialect says so (TGI and
    LMI send one token per event), else ``None``. ``output_tokens`` is the server's own count (OpenAI
    ``usage``, TGI/LMI ``details``) when it gave one, else the number of token-carrying chunks.
    ``error`` is ``None`` for a success, else its kind: an HTTP status ("429"), ``"transport"``,
    ``"stream"`` or ``"empty"``.
    """

    index: int
    send: float
    end: float = 0.0
    chunks: list[float] = field(default_factory=list)
    chunk_tokens: list[int | None] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    cached_tokens: int | None = None  # of the prompt, from the server's prefix cache, when it says
    error: str | None = None
    error_detail: str | None = None
    server_counted: bool = False  # output_tokens came from the server, not from counting chunks
    resent: bool = False  # sent again: the kept-alive connection was closed before any answer

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.send

    @property
    def ttft(self) -> float | None:
        """Send to the first chunk that carried a token; ``None`` without one."""
        return self.chunks[0] - self.send if self.chunks else None

    @property
    def tpot(self) -> float | None:
        """(e2e - TTFT) / (output tokens - 1); ``None`` for fewer than two tokens (no decode to time)."""
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Every gap between consecutive chunks."""
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**data)


def absorb(record: RequestRecord, chunk: Chunk, at: float) -> None:
    """Add what one response line said, read at time ``at``, to ``record``."""
    if chunk.error is not None:
        record.error, record.error_detail = STREAM_ERROR, chunk.error
        return
    if chunk.prompt_tokens is not None:
        record.prompt_tokens = chunk.prompt_tokens
    if chunk.cached_tokens is not None:
        record.cached_tokens = chunk.cached_tokens
    counted = record.output_tokens if record.server_counted else None
    if chunk.output_tokens is not None:
        record.output_tokens, record.server_counted = chunk.output_tokens, True
        counted = chunk.output_tokens
    if not chunk.carries:
        return
    # TGI and LMI end a stream whose last step made no token with an empty placeholder event; the
    # server's count says whether it was a token (e.g. end of sequence) or only the end.
    if chunk.final and chunk.empty and counted is not None and len(record.chunks) >= counted:
        return
    record.chunks.append(at)
    record.chunk_tokens.append(chunk.tokens)
    if not record.server_counted:
        record.output_tokens += chunk.tokens or 1


def finish(record: RequestRecord, at: float) -> None:
    """Close a record whose response ended normally at ``at``: no token at all is an empty stream."""
    record.end = at
    if record.error is None and not record.chunks:
        record.error, record.error_detail = EMPTY_STREAM, "the response ended without a token"
