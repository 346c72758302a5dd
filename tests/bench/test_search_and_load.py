"""The SLO-bounded search, arrival times, ranking and pricing, without a server."""

from __future__ import annotations

import dataclasses
import datetime
import statistics

import pytest

from lmserve.bench import BenchUsageError
from lmserve.bench.launch import ServeConfig
from lmserve.bench.metrics import summarize
from lmserve.bench.prices import PriceTable, choose_pricing, costs
from lmserve.bench.records import RequestRecord
from lmserve.bench.runner import arrival_times
from lmserve.bench.search import Level, find_max_load, level_passes
from lmserve.bench.sweep import Pinning, rank


def fake_level(concurrency: int, passes_up_to: int, seen: list[int]) -> Level:
    seen.append(concurrency)
    record = RequestRecord(0, send=0.0, end=1.0, chunks=[0.5], output_tokens=1)
    return Level(concurrency, summarize([record]), concurrency <= passes_up_to)


def test_search_probes_then_doubles_then_bisects() -> None:
    seen: list[int] = []
    best, levels = find_max_load(lambda c: fake_level(c, 11, seen), max_concurrency=16, bisect_steps=3)
    assert best == 11
    assert seen == [1, 16, 2, 4, 8, 12, 10, 11]  # sync probe, saturation probe, doubling, bisection
    assert [lv.concurrency for lv in levels] == sorted(seen)


def test_search_stops_early() -> None:
    seen: list[int] = []
    assert find_max_load(lambda c: fake_level(c, 0, seen), 64)[0] == 0 and seen == [1]
    seen.clear()
    assert find_max_load(lambda c: fake_level(c, 99, seen), 64)[0] == 64 and seen == [1, 64]


def test_a_level_with_a_failure_or_a_slow_percentile_misses() -> None:
    fast = [RequestRecord(i, send=0.0, end=0.2, chunks=[0.05, 0.1], output_tokens=2) for i in range(19)]
    slow = RequestRecord(19, send=0.0, end=3.0, chunks=[2.0, 3.0], output_tokens=2)
    assert level_passes(summarize(fast), {"ttft_ms": 100}, 95)
    # One slow request of 20 moves p99 (interpolated towards it) but not p50.
    assert level_passes(summarize([*fast, slow]), {"ttft_ms": 100}, 50)
    assert not level_passes(summarize([*fast, slow]), {"ttft_ms": 100}, 99)
    failed = RequestRecord(20, send=0.0, end=0.1, error="503")
    assert not level_passes(summarize([*fast, failed]), {"ttft_ms": 100}, 95)


def test_constant_and_poisson_arrivals() -> None:
    assert arrival_times(4, 2.0, "constant") == pytest.approx([0.0, 0.5, 1.0, 1.5])
    times = arrival_times(4000, 10.0, "poisson", seed=1)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.1, rel=0.1)  # exponential: sd = mean
    bursty = arrival_times(4000, 10.0, "poisson", burstiness=0.25, seed=1)
    bursty_gaps = [b - a for a, b in zip(bursty, bursty[1:], strict=False)]
    assert statistics.stdev(bursty_gaps) == pytest.approx(0.2, rel=0.15)  # gamma: sd = mean / sqrt(shape)


def test_ramp_up_starts_slow_and_reaches_the_rate() -> None:
    times = arrival_times(100, 10.0, "constant", ramp_up_s=4.0)
    assert times[1] - times[0] > 0.5  # at the start the rate is near zero
    assert times[-1] - times[-2] == pytest.approx(0.1)  # after the ramp, the full rate
    assert times[-1] == pytest.approx(9.9 + 2.0)  # the ramp costs half its length


def result(key: str, per_million: float, rpm: float, status: str = "ok") -> dict:
    return {"key": key, "status": status, "cost": {"per_million_output_tokens": per_million},
            "at_max": {"requests_per_min": rpm}}  # fmt: skip


def test_rank_cheapest_first_and_failures_last() -> None:
    ranked = rank([result("a", 2.0, 10), {"key": "b", "status": "failed to start"}, result("c", 1.0, 5),
                   result("d", 1.0, 7)])  # fmt: skip
    assert [r["key"] for r in ranked] == ["d", "c", "a", "b"]


def test_costs_by_hand() -> None:
    c = costs(3.6, requests_per_s=2.0, output_tokens_per_s=100.0)
    assert c["per_1k_requests"] == pytest.approx(3.6 / 7200 * 1000)
    assert c["per_million_output_tokens"] == pytest.approx(3.6 / 360000 * 1e6)
    assert costs(1.0, 0.0, 0.0)["per_million_output_tokens"] is None


def test_pricing_choices() -> None:
    table = PriceTable.load()
    assert table.date and table.instances
    assert choose_pricing(table, None, 0.5).hourly == 0.5
    named = choose_pricing(table, "c7i.large", None)
    assert named.label == "aws c7i.large" and named.table_date == table.date
    assert table.matching(2, 0) is not None and table.matching(2, 0).gpus == 0
    with pytest.raises(BenchUsageError, match="--instance"):
        choose_pricing(table, "no-such-instance", None)


def test_prices_from_an_old_table_come_with_a_warning_to_check_them() -> None:
    table = PriceTable.load()
    named = choose_pricing(table, "c7i.large", None)
    taken = datetime.date.fromisoformat(table.date)
    assert named.warning(today=taken + datetime.timedelta(days=30)) is None
    stale = named.warning(today=taken + datetime.timedelta(days=800))
    assert stale is not None and table.date in stale and "--prices" in stale and "2.2 years" in stale
    assert choose_pricing(table, None, 0.5).warning(today=taken + datetime.timedelta(days=800)) is None  # own price
    undated = dataclasses.replace(named, table_date="June 2024")
    assert "not a date" in (undated.warning() or "")


def test_pinning_keeps_small_machines_whole() -> None:
    assert Pinning.choose("auto", [0, 1]).server is None
    pinned = Pinning.choose("auto", [0, 1, 2, 3])
    assert (pinned.server, pinned.bench) == ((0, 1, 2), (3,))
    assert Pinning.choose("on", [0, 1]).bench == (1,)


def test_configuration_to_flags_and_properties() -> None:
    config = ServeConfig(2, 3, max_rolling_batch_size=16, dtype="bf16")
    assert config.key == "tp2-r3-b16-bf16" and config.max_in_flight == 48
    props = config.properties("my-model", "cpu")
    assert props["option.cpu_devices"] == "6" and props["option.max_rolling_batch_size"] == "16"
    assert "option.max_rolling_batch_prefill_tokens" not in props
    flags = config.serve_flags("cuda")
    assert "--cpu-devices" not in flags and flags[flags.index("--max-workers") + 1] == "3"
