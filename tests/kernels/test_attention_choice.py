"""The prefill attention loop is chosen by measurement, cached per machine, and the cache is checked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmserve import cpu_load
from lmserve.cpu_load import CpuReading
from lmserve.errors import ConfigError
from lmserve.kernels import Ops
from lmserve.kernels import attention_choice as ac
from lmserve.kernels.choice import cache_path

from .test_choice import QuietThenBusy


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, compiled_ops: Ops) -> Iterator[list[dict[str, float]]]:
    """Canned timings (the dot loop twice as fast unless a test changes them), a cache of its own,
    a quiet machine, and a CPU that runs the dot loop; the calls are recorded."""
    if not hasattr(compiled_ops, "attention_dot"):
        pytest.skip("the compiled kernels here have no attention")
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv(ac.FORCE_ENV, raising=False)
    result = {"fp32": 2e-3, "dot": 1e-3}
    calls: list[dict[str, float]] = []

    def fake(ops: Ops, heads: int, kv_heads: int, head_dim: int) -> dict[str, float]:
        calls.append(dict(result))
        return dict(result)

    monkeypatch.setattr(ac, "measure", fake)
    monkeypatch.setattr(ac, "dot_available", lambda ops: None)
    monkeypatch.setattr(cpu_load, "read_cpu", QuietThenBusy().read)
    calls.append(result)  # calls[0] is the result the next measurement returns
    yield calls
    compiled_ops.attention_dot = False  # type: ignore[attr-defined]


def test_the_faster_loop_is_chosen_and_cached(compiled_ops: Ops, timed: list[dict[str, float]]) -> None:
    assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16) is True
    assert compiled_ops.attention_dot is True  # type: ignore[attr-defined]
    assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16) is True and len(timed) == 2  # from the cache
    timed[0].update(fp32=1.05e-3, dot=1e-3)  # another layout, where the dot loop barely wins: not worth it
    assert ac.choose_attention(compiled_ops, 32, 4, 64, torch.bfloat16) is False and len(timed) == 3
    assert compiled_ops.attention_dot is False  # type: ignore[attr-defined]


def test_an_fp32_cache_or_a_cpu_without_the_instructions_keeps_the_fp32_loop(
        compiled_ops: Ops, timed: list[dict[str, float]], monkeypatch: pytest.MonkeyPatch) -> None:
    assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.float32) is False
    monkeypatch.setattr(ac, "dot_available", lambda ops: "this CPU lacks avx512_bf16")
    assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16) is False
    assert len(timed) == 1  # nothing was measured


def test_untrusted_cache_entries_are_measured_again(compiled_ops: Ops, timed: list[dict[str, float]]) -> None:
    ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16)
    path = cache_path(ac.table_key(compiled_ops), "attention")
    good = json.loads(path.read_text())
    bad_entry = json.loads(path.read_text())
    bad_entry["data"]["layouts"]["9/3x64"]["dot"] = "fast"
    another_machine = {**good, "key": {**good["key"], "cpu_model": "another CPU"}}
    for bad in ("\0\0", json.dumps(bad_entry), json.dumps(another_machine)):
        path.write_text(bad)
        before = len(timed)
        assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16) is True and len(timed) == before + 1


def test_timings_beside_a_busy_process_are_used_but_not_cached(compiled_ops: Ops, timed: list[dict[str, float]],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_load, "read_cpu", QuietThenBusy(others=1.0).read)
    assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16) is True
    assert not cache_path(ac.table_key(compiled_ops), "attention").exists()


class TickNoise:
    """Counters as an idle machine shows them over a measurement of a few milliseconds: a tick
    of CPU time lands on another core within it, reading as cores' worth of other processes; the
    longer watch after it shows what they really take (``later`` cores)."""

    def __init__(self, later: float) -> None:
        self.later, self.reads, self.wall, self.busy = later, 0, 0.0, 0.0

    def read(self, cores: object) -> CpuReading:
        self.reads += 1
        if self.reads == 2:  # the end of the short watch: 5 ms, and two ticks counted on other cores
            self.wall, self.busy = self.wall + 0.005, self.busy + 0.02
        elif self.reads > 2:
            self.wall, self.busy = self.wall + 0.25, self.busy + 0.25 * self.later
        return CpuReading(self.wall, 0.0, self.busy)


@pytest.mark.parametrize(("later", "cached"), [(0.0, True), (1.0, False)])
def test_a_watch_too_short_to_tell_asks_the_counters_again(compiled_ops: Ops, timed: list[dict[str, float]],
                                                            monkeypatch: pytest.MonkeyPatch, later: float,
                                                            cached: bool) -> None:
    counters = TickNoise(later)
    monkeypatch.setattr(cpu_load, "read_cpu", counters.read)
    assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16) is True
    assert counters.reads == 4  # the measurement's watch, then one of BUSY_SAMPLE_S
    assert cache_path(ac.table_key(compiled_ops), "attention").exists() is cached


def test_the_real_measurement_times_both_loops(compiled_ops: Ops) -> None:
    if ac.dot_available(compiled_ops) is not None:
        pytest.skip("no bf16 dot-product attention here")
    times = ac.measure(compiled_ops, 9, 3, 64)
    assert set(times) == {"fp32", "dot"} and all(0 < t < 1 for t in times.values())
    assert compiled_ops.attention_dot is False  # type: ignore[attr-defined]  # restored


def test_the_environment_forces_a_loop(compiled_ops: Ops, timed: list[dict[str, float]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ac.FORCE_ENV, "fp32")
    assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16) is False
    monkeypatch.setenv(ac.FORCE_ENV, "dot")
    timed[0].update(fp32=1e-3, dot=2e-3)  # slower, but forced
    assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16) is True and len(timed) == 1
    monkeypatch.setattr(ac, "dot_available", lambda ops: "this CPU lacks avx512_bf16")
    assert ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16) is False  # not where it cannot run
    monkeypatch.setenv(ac.FORCE_ENV, "fastest")
    with pytest.raises(ConfigError, match="LMSERVE_ATTENTION_KERNEL.*'fastest'.*auto, fp32, dot"):
        ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16)


def test_the_kernels_report_shows_each_layouts_loop(compiled_ops: Ops, timed: list[dict[str, float]],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from lmserve.cli import main

    assert main(["kernels", "--report"]) == 0
    assert "prefill attention over a bf16 cache: no choice measured yet" in capsys.readouterr().out
    ac.choose_attention(compiled_ops, 9, 3, 64, torch.bfloat16)  # the dot loop, twice as fast
    timed[0].update(fp32=1e-3, dot=1e-3)
    ac.choose_attention(compiled_ops, 32, 4, 64, torch.bfloat16)  # no gain: fp32
    assert main(["kernels", "--report"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if "/" in line}
    assert rows["9/3x64"] == ["2.000", "1.000*"] and rows["32/4x64"] == ["1.000*", "1.000"]
