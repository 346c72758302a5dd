"""Prometheus metrics of the server: request latencies, token counts, engine state."""

from lmserve.metrics.server_metrics import RequestTimer, ServerMetrics

__all__ = ["RequestTimer", "ServerMetrics"]
