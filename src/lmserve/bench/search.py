"""The highest load a configuration sustains under an SLO.

A load level is a closed loop at one concurrency with enough requests that its percentiles mean
something (at least ``min_requests``, and two rounds of the concurrency). A level *passes* when no
request failed and the chosen percentile of each SLO latency is within its limit.

The search: a synchronous probe (concurrency 1: if even that misses the SLO, the configuration
cannot meet it), a saturation probe (the most the configuration can hold in flight: if that passes,
it is the answer), then doubling from 2 until a level fails, then bisection between the last pass
and the first failure. Levels already measured are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmserve.bench.metrics import Summary

SLO_METRICS = {"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "e2e_ms": "e2e_ms"}


@dataclass(frozen=True)
class Level:
    """One measured load level."""

    concurrency: int
    summary: Summary
    passed: bool
    server: dict[str, float] = field(default_factory=dict)  # cpu_percent, rss_mib of the server tree
    bench_cpu_percent: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "passed": self.passed, "summary": self.summary.to_json(),
                "server": self.server, "bench_cpu_percent": self.bench_cpu_percent}  # fmt: skip


def level_passes(summary: Summary, slo: dict[str, float], percentile: int) -> bool:
    """No failure, and the ``percentile`` of each SLO latency within its limit."""
    if summary.failed or not summary.completed:
        return False
    name = f"p{percentile}"
    for key, limit in slo.items():
        stats = getattr(summary, SLO_METRICS[key])
        if stats.count and stats.get(name) > limit:  # no TPOT at all (one-token outputs) meets it
            return False
    return True


def requests_for(concurrency: int, min_requests: int) -> int:
    return max(min_requests, 2 * concurrency)


def find_max_load(measure: Callable[[int], Level], max_concurrency: int, bisect_steps: int = 4) -> tuple[int, list[Level]]:
    """The highest passing concurrency (0 when concurrency 1 fails) and every level measured."""
    levels: dict[int, Level] = {}

    def at(c: int) -> Level:
        if c not in levels:
            levels[c] = measure(c)
        return levels[c]

    def result(best: int) -> tuple[int, list[Level]]:
        return best, [levels[c] for c in sorted(levels)]

    if not at(1).passed:
        return result(0)
    if max_concurrency <= 1:
        return result(1)
    if at(max_concurrency).passed:
        return result(max_concurrency)
    low, high, c = 1, max_concurrency, 2
    while c < max_concurrency:
        if not at(c).passed:
            high = c
            break
        low, c = c, c * 2
    for _ in range(bisect_steps):
        if high - low <= 1:
            break
        mid = (low + high) // 2
        if at(mid).passed:
            low = mid
        else:
            high = mid
    return result(low)
