"""The server's Prometheus metrics, in a registry of its own (never the process-global one).

Request-level series are measured in the frontend as tokens stream out; engine-level series
(running/waiting requests, KV cache use, preemptions) come from the engine's ``EngineStats``,
refreshed when ``/metrics`` is scraped. Definitions follow the common open benchmarks:
TTFT = arrival to first token, inter-token latency = gap between streamed token deltas (divided by
the tokens a delta carries), e2e = arrival to last token, queue time = engine received the request
to the start of the step that produced its first token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from lmserve.engine.outputs import RequestDelta
from lmserve.engine.protocol import EngineStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)  # fmt: skip


class _EngineTotals(Collector):
    """Engine counters that only the engine knows (it reports running totals, not increments)."""

    def __init__(self) -> None:
        self.stats = EngineStats()

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("lmserve_num_preemptions", "Requests preempted by the engine (recompute).",
                                  value=self.stats.num_preempted_total)  # fmt: skip
        yield CounterMetricFamily("lmserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                                  value=self.stats.prefix_cache_hit_tokens_total)  # fmt: skip
        yield CounterMetricFamily("lmserve_engine_steps", "Engine steps run.", value=self.stats.steps_total)


class ServerMetrics:
    """Every metric the server exposes; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("lmserve_time_to_first_token_seconds", "Arrival to first generated token.",
                              registry=r, buckets=_LATENCY_BUCKETS)  # fmt: skip
        self.itl = Histogram("lmserve_inter_token_latency_seconds", "Time between generated tokens.",
                             registry=r, buckets=_ITL_BUCKETS)  # fmt: skip
        self.e2e = Histogram("lmserve_e2e_request_latency_seconds", "Arrival to last generated token.",
                             registry=r, buckets=_LATENCY_BUCKETS)  # fmt: skip
        self.queue = Histogram("lmserve_request_queue_time_seconds",
                               "Engine receipt to the step that produced the first token.",
                               registry=r, buckets=_LATENCY_BUCKETS)  # fmt: skip
        self.running = Gauge("lmserve_num_requests_running", "Requests the engine is running.", registry=r)
        self.waiting = Gauge("lmserve_num_requests_waiting", "Requests waiting in the engine.", registry=r)
        self.kv_usage = Gauge("lmserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use.", registry=r)
        self.prompt_tokens = Counter("lmserve_prompt_tokens", "Prompt tokens of requests that started.", registry=r)
        self.generation_tokens = Counter("lmserve_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("lmserve_request_finished", "Requests finished, by reason.",
                                ["finish_reason"], registry=r)  # fmt: skip
        self.http_responses = Counter("lmserve_http_responses", "HTTP responses, by route and status code.",
                                      ["route", "code"], registry=r)  # fmt: skip
        self.batch_size = Histogram("lmserve_handler_batch_size", "Requests per batch handed to a handler.",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))  # fmt: skip
        self.batch_queue = Histogram("lmserve_handler_queue_time_seconds",
                                     "Arrival in the dynamic batcher to the start of its batch.",
                                     registry=r, buckets=_LATENCY_BUCKETS)  # fmt: skip
        self.handler_latency = Histogram("lmserve_handler_latency_seconds",
                                         "Time a handler took for one batch (to the end of a stream).",
                                         registry=r, buckets=_LATENCY_BUCKETS)  # fmt: skip
        self._engine = _EngineTotals()
        r.register(self._engine)

    def observe_batch(self, size: int, queue_waits: list[float], handler_s: float) -> None:
        """One batch a handler ran: its size, each request's wait in the queue, the handler's time."""
        self.batch_size.observe(size)
        for wait in queue_waits:
            self.batch_queue.observe(wait)
        self.handler_latency.observe(handler_s)

    def update_engine(self, stats: EngineStats) -> None:
        """Take the engine's latest snapshot (summed over replicas)."""
        self._engine.stats = stats
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)

    def count_response(self, route: str, code: int) -> None:
        self.http_responses.labels(route=route, code=str(code)).inc()

    def request(self, prompt_tokens: int) -> RequestTimer:
        """Start timing one request that arrived now."""
        return RequestTimer(self, prompt_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Times one request: feed it every delta with ``on_delta``, then call ``finish`` once."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int) -> None:
        self._m, self._prompt_tokens = metrics, prompt_tokens
        self.arrival = time.perf_counter()
        self._last_token: float | None = None
        self._done = False

    def on_delta(self, delta: RequestDelta, queue_time_s: float | None) -> None:
        now, tokens = time.perf_counter(), len(delta.token_ids)
        if self._last_token is None and (tokens or delta.finished):
            self._m.prompt_tokens.inc(self._prompt_tokens)
            if queue_time_s is not None:
                self._m.queue.observe(queue_time_s)
        if tokens:
            if self._last_token is None:
                self._m.ttft.observe(now - self.arrival)
            else:
                gap = (now - self._last_token) / tokens
                for _ in range(tokens):
                    self._m.itl.observe(gap)
            self._last_token = now
            self._m.generation_tokens.inc(tokens)
        if delta.finished:
            self.finish(delta.finish_reason or "stop")

    def finish(self, reason: str) -> None:
        """Record the end (``stop``, ``length``, ``abort``, ``error``, ``timeout``, ...); later calls do nothing."""
        if self._done:
            return
        self._done = True
        self._m.finished.labels(finish_reason=reason).inc()
        if self._last_token is not None:
            self._m.e2e.observe(self._last_token - self.arrival)
