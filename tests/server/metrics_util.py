"""Read one value from the server's /metrics, as a scraper would."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric(http: httpx.Client, sample_name: str, **labels: str) -> float:
    """The value of ``sample_name`` with these labels (0 when absent)."""
    text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for_metric(http: httpx.Client, sample_name: str, expected: float, timeout: float = 5.0,
                    **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while (value := metric(http, sample_name, **labels)) != expected:
        assert time.monotonic() < deadline, f"{sample_name}{labels} stayed {value}, expected {expected}"
        time.sleep(0.05)
