"""/metrics: request latencies, token counts, engine gauges and HTTP responses, in Prometheus text."""

from __future__ import annotations

import httpx

from tests.server.metrics_util import metric


def test_metrics_count_what_was_served(http: httpx.Client) -> None:
    before = {name: metric(http, name) for name in (
        "lmserve_time_to_first_token_seconds_count", "lmserve_e2e_request_latency_seconds_count",
        "lmserve_inter_token_latency_seconds_count", "lmserve_request_queue_time_seconds_count",
        "lmserve_prompt_tokens_total", "lmserve_generation_tokens_total")}  # fmt: skip
    ok_before = metric(http, "lmserve_http_responses_total", route="/invocations", code="200")
    bad_before = metric(http, "lmserve_http_responses_total", route="/invocations", code="400")
    for _ in range(2):
        r = http.post("/invocations", json={"inputs": "hello world", "parameters": {"max_new_tokens": 5}})
        assert r.status_code == 200
    assert http.post("/invocations", json={"inputs": ""}).status_code == 400

    after = {name: metric(http, name) for name in before}
    assert after["lmserve_time_to_first_token_seconds_count"] - before["lmserve_time_to_first_token_seconds_count"] == 2
    assert after["lmserve_e2e_request_latency_seconds_count"] - before["lmserve_e2e_request_latency_seconds_count"] == 2
    assert after["lmserve_inter_token_latency_seconds_count"] - before["lmserve_inter_token_latency_seconds_count"] == 8
    assert after["lmserve_request_queue_time_seconds_count"] - before["lmserve_request_queue_time_seconds_count"] == 2
    assert after["lmserve_prompt_tokens_total"] - before["lmserve_prompt_tokens_total"] == 4
    assert after["lmserve_generation_tokens_total"] - before["lmserve_generation_tokens_total"] == 10
    assert metric(http, "lmserve_http_responses_total", route="/invocations", code="200") - ok_before == 2
    assert metric(http, "lmserve_http_responses_total", route="/invocations", code="400") - bad_before == 1
    assert metric(http, "lmserve_time_to_first_token_seconds_sum") > 0


def test_engine_gauges_and_counters_are_exposed(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    for name in ("lmserve_num_requests_running", "lmserve_num_requests_waiting", "lmserve_kv_cache_usage_ratio",
                 "lmserve_num_preemptions_total", "lmserve_engine_steps_total"):
        assert f"\n{name} " in text, name
    assert metric(http, "lmserve_engine_steps_total") > 0
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")
