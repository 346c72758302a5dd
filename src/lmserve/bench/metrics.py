"""Metrics derived from raw request records. Definitions (also in ``lmserve bench --help``):

- TTFT: send to the first chunk carrying a token.
- TPOT: per request, (e2e - TTFT) / (output tokens - 1); requests with fewer than two tokens have none.
- ITL: every gap between consecutive chunks, over all successful requests (a chunk carrying several
  tokens is one gap, as the client saw it).
- e2e: send to the end of the response.
- Duration: first send to last end, over every request. Request, output-token and total-token
  (prompt + output) throughput are successful requests' counts over that duration.
- Goodput: successful requests meeting every SLO given, over the duration. A request without a TPOT
  (one token) meets any TPOT objective: it has no decode phase to be slow in.
- Errors: failed requests by kind (HTTP status, ``transport``, ``stream``, ``empty``).
- Prompt tokens cached: of the successful requests' prompt tokens, those the server says it took
  from its prefix cache (OpenAI ``usage.prompt_tokens_details.cached_tokens``); their prefill was not
  measured. Shown only when a server said so and it is not zero.

Percentiles interpolate linearly between the two nearest ranks (numpy's default).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmserve.bench import BenchUsageError
from lmserve.bench.records import RequestRecord

PERCENTILES = (50, 90, 95, 99)
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles of one latency, in milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = [s * 1000 for s in seconds]
        mean = sum(ms) / len(ms) if ms else math.nan
        return cls(len(ms), mean, *(percentile(ms, q) for q in PERCENTILES))

    def get(self, name: str) -> float:
        return float(getattr(self, name))


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft_ms=500,tpot_ms=50"`` -> ``{"ttft_ms": 500.0, "tpot_ms": 50.0}``."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in SLO_KEYS:
            raise BenchUsageError(f"--slo: {part!r} is not KEY=MILLISECONDS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            slo[key.strip()] = float(value)
        except ValueError:
            raise BenchUsageError(f"--slo: {key.strip()}={value!r} is not a number of milliseconds") from None
        if slo[key.strip()] <= 0:
            raise BenchUsageError(f"--slo: {key.strip()} must be > 0 ms, got {value}")
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a successful request meets every objective in ``slo`` (see the module docstring)."""
    if not record.ok:
        return False
    measured = {"ttft_ms": record.ttft, "tpot_ms": record.tpot, "e2e_ms": record.e2e}
    return all(measured[k] is None or measured[k] * 1000 <= limit for k, limit in slo.items())  # type: ignore[operator]


@dataclass(frozen=True)
class Summary:
    """Everything ``lmserve bench`` reports about one run."""

    num_requests: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    total_output_tokens: int
    total_prompt_tokens: int
    # Of those, served from the server's prefix cache (None: the server did not say): their prefill
    # was not measured.
    cached_prompt_tokens: int | None
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    slo: dict[str, float] = field(default_factory=dict)
    good: int = 0
    goodput: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def failure_lines(records: Sequence[RequestRecord]) -> list[str]:
    """One line per kind of failure: how many requests failed that way, and the first one's detail."""
    lines = []
    for kind, count in sorted(Counter(r.error for r in records if r.error is not None).items()):
        detail = next(r.error_detail for r in records if r.error == kind)
        lines.append(f"{count} request(s) failed with {kind}" + (f": {detail}" if detail else ""))
    return lines


def summarize(records: Sequence[RequestRecord], slo: dict[str, float] | None = None) -> Summary:
    """Derive the summary of a run from its records (see the module docstring for definitions)."""
    slo = slo or {}
    done = [r for r in records if r.ok]
    duration = (max(r.end for r in records) - min(r.send for r in records)) if records else 0.0
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    said = [r.cached_tokens for r in done if r.cached_tokens is not None]
    good = sum(meets_slo(r, slo) for r in done)

    def per_s(n: float) -> float:
        return n / duration if duration > 0 else 0.0

    return Summary(
        num_requests=len(records), completed=len(done), failed=len(records) - len(done),
        errors=dict(sorted(Counter(r.error for r in records if r.error is not None).items())),
        duration_s=duration, request_throughput=per_s(len(done)), output_token_throughput=per_s(output_tokens),
        total_token_throughput=per_s(output_tokens + prompt_tokens), total_output_tokens=output_tokens,
        total_prompt_tokens=prompt_tokens, cached_prompt_tokens=sum(said) if said else None,
        ttft_ms=Stats.of([t for r in done if (t := r.ttft) is not None]),
        tpot_ms=Stats.of([t for r in done if (t := r.tpot) is not None]),
        itl_ms=Stats.of([gap for r in done for gap in r.itls]),
        e2e_ms=Stats.of([r.e2e for r in done]),
        slo=dict(slo), good=good, goodput=per_s(good),
    )  # fmt: skip
