"""The per-machine linear kernel choice: every candidate agrees with the reference within bf16
arithmetic, the plan follows the timings, the cache is trusted only under this machine's key, and a
layer multiplies by the form chosen for its number of rows."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from lmserve import cpu_load
from lmserve.cpu_load import CpuReading
from lmserve.errors import ConfigError
from lmserve.kernels import Ops, candidates, choice
from lmserve.kernels.candidates import CANDIDATES, unpack_panels
from lmserve.kernels.choice import ChoiceTable, plan_for
from lmserve.kernels.machine import write_keyed
from lmserve.parallel.layers import ColumnParallelLinear, GateUpSwiGLU


def bf16_bound(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What "equal" means for a product computed in bf16: rounding each activation to bf16 changes
    each term x_k w_k by at most 2^-8 relative (2^-9 plus the rounding of the result), so the sum
    moves by a random walk of about 2^-8 * sqrt(sum_k (x_k w_k)^2); a bf16 result adds 2^-8 |y|.
    Four times that leaves room for the tails without admitting a wrong kernel (which is off by
    about |y| or sqrt(sum_k (x_k w_k)^2) itself)."""
    walk = ((x.double() ** 2) @ (w.double() ** 2).T).sqrt()
    return 4 * 2.0**-8 * (walk + y.abs()) + 1e-6


@pytest.mark.parametrize("name", list(CANDIDATES))
@pytest.mark.parametrize("m", [1, 7, 130])
@pytest.mark.parametrize("k", [576, 2100])  # one K block, and several (of 512 or 1024 features)
def test_every_candidate_matches_the_reference_within_bf16(compiled_ops: Ops, name: str, m: int, k: int) -> None:
    if (why := candidates.unavailable(name, compiled_ops)) is not None:
        pytest.skip(why)
    torch.manual_seed(m + k)
    n = 100
    w, x, bias = torch.randn(n, k).bfloat16(), torch.randn(m, k), torch.randn(n)
    form = CANDIDATES[name].prepare(compiled_ops.pack_linear_weight(w))
    want = x.double() @ w.double().T + bias.double()
    got = compiled_ops.linear(x, form, bias).double()
    assert got.shape == (m, n) and bool(((got - want).abs() <= bf16_bound(x, w, want)).all())
    gate, up = torch.randn(n, k).bfloat16(), torch.randn(n, k).bfloat16()
    form = CANDIDATES[name].prepare(compiled_ops.pack_gate_up_weight(gate, up))
    g, u = x.double() @ gate.double().T, x.double() @ up.double().T
    want = torch.nn.functional.silu(g) * u
    # silu(g) u moves by at most |u| times g's error plus |silu(g)| times u's error.
    bound = bf16_bound(x, gate, g) * u.abs() * 1.1 + bf16_bound(x, up, u) * g.abs()
    got = compiled_ops.linear_silu_mul(x, form).double()
    assert bool(((got - want).abs() <= bound + 1e-5).all())


def test_unpack_panels_inverts_packing(compiled_ops: Ops) -> None:
    w = torch.randn(70, 33).bfloat16()
    assert torch.equal(unpack_panels(compiled_ops.pack_linear_weight(w)), w)
    gate, up = torch.randn(40, 33).bfloat16(), torch.randn(40, 33).bfloat16()
    assert torch.equal(unpack_panels(compiled_ops.pack_gate_up_weight(gate, up)), torch.cat([gate, up]))


def timings(own: list[float], other: list[float], rows: list[int]) -> dict[str, dict[str, float]]:
    return {str(r): {"own": o, "torch-bf16": t, "torch-fp32": 100.0} for r, o, t in zip(rows, own, other, strict=True)}


def test_plan_follows_the_timings() -> None:
    rows = [1, 8, 64, 256]
    # own wins decode, torch wins prefill (one noisy bucket at 256 does not flip it back)
    assert plan_for(timings([1, 1, 4, 8], [3, 3, 2, 9], rows)) == [(1, "own"), (64, "torch-bf16")]
    assert plan_for(timings([1, 1, 4, 8], [3, 3, 2, 3], rows)) == [(1, "own"), (64, "torch-bf16")]
    assert plan_for(timings([2, 2, 2, 2], [1, 1, 1, 1], rows)) == [(1, "torch-bf16")]  # panels dropped
    # 5% faster is not worth a second copy of the weight
    assert plan_for(timings([1, 1, 1, 1], [1, 1, 0.95, 0.95], rows)) == [(1, "own")]
    # an fp32 copy is twice the panels' size: 1.5x faster does not pay for it, 3x does
    fp32 = {str(r): {"own": 3.0, "torch-bf16": 9.0, "torch-fp32": f} for r in rows for f in [2.0]}
    assert plan_for(fp32) == [(1, "own")]
    fp32 = {str(r): {"own": 3.0, "torch-bf16": 9.0, "torch-fp32": 1.0} for r in rows}
    assert plan_for(fp32) == [(1, "torch-fp32")]


def test_plan_takes_the_dot_product_kernel_only_where_it_pays() -> None:
    rows = [1, 8, 64, 256]

    def t(own: list[float], dot: list[float], torch_bf16: list[float]) -> dict[str, dict[str, float]]:
        return {str(r): {"own": o, "own-dot": d, "torch-bf16": b, "torch-fp32": 100.0}
                for r, o, d, b in zip(rows, own, dot, torch_bf16, strict=True)}

    # twice the FMA kernel from 8 rows on: it replaces the panels altogether
    assert plan_for(t([1, 2, 8, 32], [1, 1, 4, 16], [9, 9, 9, 99])) == [(1, "own-dot")]
    # ... and hands the largest rows to torch where that is faster still
    assert plan_for(t([1, 2, 8, 32], [1, 1, 4, 16], [9, 9, 9, 8])) == [(1, "own-dot"), (256, "torch-bf16")]
    # one row count 15% faster is one timing, not enough for a second copy; two row counts are
    assert plan_for(t([1, 2, 8, 32], [1, 1, 4, 16], [9, 9, 9, 14])) == [(1, "own-dot")]
    assert plan_for(t([1, 2, 8, 32], [1, 1, 4, 16], [9, 9, 3.5, 14])) == [(1, "own-dot"), (64, "torch-bf16")]
    # 5% is not worth rounding the activations to bf16
    assert plan_for(t([1, 1, 1, 1], [0.95, 0.95, 0.95, 0.95], [9, 9, 9, 9])) == [(1, "own")]


def test_dot_product_layout_pairs_adjacent_features() -> None:
    from lmserve.kernels.packed import pack_pairs

    w = torch.arange(40 * 3, dtype=torch.float32).view(40, 3).bfloat16()  # 2 panels, K padded to 4
    p = pack_pairs(w)
    assert p.shape == (2, 4, 32)
    pair0 = p[0, :2].reshape(-1)  # features 0 and 1: columns 0-15 then 16-31, two features each
    assert pair0[:4].tolist() == [w[0, 0], w[0, 1], w[1, 0], w[1, 1]]
    assert pair0[32:34].tolist() == [w[16, 0], w[16, 1]]
    assert p[0, 2:].reshape(-1)[1].item() == 0  # feature 3 is padding
    assert p[1, :2].reshape(-1)[16:].abs().sum().item() == 0  # columns 40-63 are padding


def test_forced_candidate(monkeypatch: pytest.MonkeyPatch, compiled_ops: Ops) -> None:
    monkeypatch.setenv(choice.FORCE_ENV, "torch-bf16")
    w = compiled_ops.pack_linear_weight(torch.randn(64, 64).bfloat16())
    table = choice.choose(compiled_ops, [(w, 512)])
    assert table.source == "forced" and table.plan(w) == [(1, "torch-bf16")]
    monkeypatch.setenv(choice.FORCE_ENV, "fastest-please")
    with pytest.raises(ConfigError, match="fastest-please.*own, own-dot, torch-bf16"):
        choice.choose(compiled_ops, [(w, 512)])


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Measurements replaced by canned timings, recorded by shape; a cache of its own."""
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv(choice.FORCE_ENV, raising=False)
    calls: list[str] = []

    def fake(ops: Ops, w: object, rows: list[int], deadline: float, before: object,
             names: object) -> dict[str, dict[str, float]]:
        calls.append(choice.shape_key(w))  # type: ignore[arg-type]
        return timings([1.0] * len(rows), [0.5] * len(rows), rows)

    monkeypatch.setattr(choice, "measure", fake)
    monkeypatch.setattr(choice, "runnable_candidates", lambda ops=None: list(CANDIDATES))
    monkeypatch.setattr(cpu_load, "read_cpu", QuietThenBusy().read)  # a quiet machine unless a test says
    return calls


class QuietThenBusy:
    """Made-up CPU counters: other processes take ``others`` cores (0: nobody else runs)."""

    def __init__(self, others: float = 0.0) -> None:
        self.others, self.wall, self.busy = others, 0.0, 0.0

    def read(self, cores: object) -> CpuReading:
        self.wall += 1.0
        self.busy += self.others
        return CpuReading(self.wall, 0.0, self.busy)


def test_cache_is_used_and_untrusted_entries_are_measured_again(compiled_ops: Ops, counted: list[str],
                                                                 tmp_path: Path) -> None:
    w = compiled_ops.pack_linear_weight(torch.randn(64, 96).bfloat16())
    table = choice.choose(compiled_ops, [(w, 128), (w, 64)])
    assert counted == ["64x96"] * choice.PASSES and table.source == "measured" and table.plan(w) == [(1, "torch-bf16")]
    assert choice.choose(compiled_ops, [(w, 128)]).source == "cache" and len(counted) == choice.PASSES
    assert choice.choose(compiled_ops, [(w, 1024)]).source == "measured"  # larger prefill chunks
    path = choice.cache_path(choice.table_key(compiled_ops))
    assert path.parent == tmp_path / "kernels"
    good = path.read_text()
    for bad in (good[: len(good) // 2], "\0\0\0", json.dumps({"key": "x", "data": {}})):
        path.write_text(bad)  # truncated, corrupt, another format
        before = len(counted)
        assert choice.choose(compiled_ops, [(w, 1024)]).source == "measured" and len(counted) == before + choice.PASSES
    doc = json.loads(good)
    write_keyed(path, {**doc["key"], "cpu_model": "another CPU"}, doc["data"])  # another machine's
    assert choice.choose(compiled_ops, [(w, 128)]).source == "measured"
    doc = json.loads(path.read_text())
    doc["data"]["shapes"]["64x96"]["timings"]["1"]["own"] = "fast"  # a malformed entry
    path.write_text(json.dumps(doc))
    assert choice.choose(compiled_ops, [(w, 128)]).source == "measured"


def test_timings_taken_beside_a_busy_process_are_measured_again_only_once_the_machine_is_quiet(
        compiled_ops: Ops, counted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(choice, "BUSY_SAMPLE_S", 0.0)
    w = compiled_ops.pack_linear_weight(torch.randn(64, 96).bfloat16())
    monkeypatch.setattr(cpu_load, "read_cpu", QuietThenBusy(others=1.0).read)  # one core taken
    assert choice.choose(compiled_ops, [(w, 64)]).plan(w) == [(1, "torch-bf16")]  # used for this start
    measured = len(counted)
    # A start beside a busy process again uses them: measuring once more would be just as contended.
    table = choice.choose(compiled_ops, [(w, 64)])
    assert table.source == "contended cache" and len(counted) == measured
    monkeypatch.setattr(cpu_load, "read_cpu", QuietThenBusy(others=0.2).read)  # a little background
    assert choice.choose(compiled_ops, [(w, 64)]).source == "measured"  # a quiet start measures them again
    assert len(counted) == measured + choice.PASSES
    assert choice.choose(compiled_ops, [(w, 64)]).source == "cache"  # and from then on trusts them
    monkeypatch.setattr(cpu_load, "read_cpu", QuietThenBusy(others=1.0).read)
    assert choice.choose(compiled_ops, [(w, 64)]).source == "cache"  # a busy start keeps the quiet timings


def test_a_malformed_contended_mark_is_not_trusted(compiled_ops: Ops, counted: list[str]) -> None:
    w = compiled_ops.pack_linear_weight(torch.randn(64, 96).bfloat16())
    choice.choose(compiled_ops, [(w, 64)])
    path = choice.cache_path(choice.table_key(compiled_ops))
    doc = json.loads(path.read_text())
    doc["data"]["shapes"]["64x96"]["contended"] = "no"
    path.write_text(json.dumps(doc))
    assert choice.choose(compiled_ops, [(w, 64)]).source == "measured"


def test_another_thread_count_keeps_its_own_timings_beside_these(compiled_ops: Ops, counted: list[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    w = compiled_ops.pack_linear_weight(torch.randn(64, 96).bfloat16())
    assert choice.choose(compiled_ops, [(w, 64)]).source == "measured"
    mine = choice.cache_path(choice.table_key(compiled_ops))
    kept = mine.read_text()
    key, table_key = choice.table_key(compiled_ops), choice.table_key
    monkeypatch.setattr(choice, "table_key", lambda ops: {**key, "threads": key["threads"] + 1})
    assert choice.choose(compiled_ops, [(w, 64)]).source == "measured"  # a rank with one more thread
    assert choice.cache_path(choice.table_key(compiled_ops)) != mine and mine.read_text() == kept
    monkeypatch.setattr(choice, "table_key", table_key)
    assert choice.choose(compiled_ops, [(w, 64)]).source == "cache"  # ours was not replaced


def test_layer_multiplies_by_the_form_for_its_rows(compiled_ops: Ops) -> None:
    torch.manual_seed(0)
    layer = ColumnParallelLinear(96, [64], dtype=torch.bfloat16)
    layer.weight.data.copy_(torch.randn(64, 96))
    plain = layer.weight.data.clone()
    layer.finalize(compiled_ops)
    table = ChoiceTable({"64x96": timings([1, 1, 4], [3, 3, 1], [1, 8, 64])})
    assert layer.packed is not None
    layer.route(table.forms(layer.packed))
    assert layer.for_rows(torch.zeros(8, 96)).layout == "panel32"  # type: ignore[union-attr]
    assert layer.for_rows(torch.zeros(2, 40, 96)).layout == "plain"  # type: ignore[union-attr]
    for rows in (1, 100):
        x = torch.randn(rows, 96)
        want = x.double() @ plain.double().T
        assert bool(((layer(x).double() - want).abs() <= bf16_bound(x, plain, want)).all())


def test_gate_up_layer_with_one_form_drops_the_panels(compiled_ops: Ops) -> None:
    layer = GateUpSwiGLU(64, 32, dtype=torch.bfloat16)
    layer.weight.data.copy_(torch.randn(64, 64))
    layer.finalize(compiled_ops)
    assert layer.packed is not None
    layer.route(ChoiceTable({}, forced="torch-bf16").forms(layer.packed))
    assert layer.packed.layout == "plain" and layer.packed.gate_up
    assert layer(torch.randn(3, 64)).shape == (3, 32)


def test_kernels_report_prints_the_machine_and_the_table(compiled_ops: Ops, counted: list[str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from lmserve.cli import main
    from lmserve.kernels.machine import cpu_model

    assert main(["kernels", "--report"]) == 0
    assert "none measured yet" in capsys.readouterr().out
    assert main(["kernels", "--report", "--shapes", "64x96,32x64+silu", "--max-rows", "64"]) == 0
    out = capsys.readouterr().out
    assert f"CPU: {cpu_model()}" in out and f"kernels: {compiled_ops.name}" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["64x96", "64"] in [row[:2] for row in lines] and ["32x64+silu", "1"] in [row[:2] for row in lines]
    col = 2 + list(CANDIDATES).index("torch-bf16")
    assert all(row[col].endswith("*") for row in lines if row[:1] == ["64x96"])  # torch-bf16 was faster
    assert main(["kernels"]) == 0 and "64x96" in capsys.readouterr().out  # from the cache now
    assert main(["kernels", "--shapes", "64x96+gelu"]) == 2


def test_a_torch_kernel_that_crashes_is_never_timed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """oneDNN may pick AMX on a machine that reports it and faults on it: such a candidate is tried
    in a child process first, and a crash keeps it out of the server process for good. That is
    worth a warning; a kernel the build does not have (here the own dot-product one, with no ops)
    is expected, and only logged as information."""
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path))
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    fine = [sys.executable, "-c", "pass"]
    monkeypatch.setattr(candidates, "_probe_command", lambda name: crash if name == "torch-bf16" else fine)
    with caplog.at_level(logging.INFO, logger=candidates.__name__):
        assert candidates.runnable_candidates() == ["own", "torch-fp32"]
    levels = {r.getMessage().split()[3]: r.levelno for r in caplog.records if "not using the" in r.getMessage()}
    assert levels == {"torch-bf16": logging.WARNING, "own-dot": logging.INFO}
    monkeypatch.setattr(candidates, "_probe_command", lambda name: fine)  # remembered, not tried again
    assert candidates.runnable_candidates() == ["own", "torch-fp32"]
    # timings without the refused candidate still make a plan
    assert plan_for({"1": {"own": 1.0, "torch-fp32": 9.0}, "64": {"own": 5.0, "torch-fp32": 1.0}}) == [
        (1, "own"), (64, "torch-fp32")]


def test_the_real_probe_passes_here() -> None:
    with pytest.raises(SystemExit) as done:
        candidates.probe_main("torch-bf16")
    assert done.value.code == 0


def test_row_counts_are_timed_in_order_of_need() -> None:
    rows = choice.buckets(2048)
    order = choice.measure_order(rows)
    assert order[:3] == [1, 256, 32] and sorted(order) == rows  # decode, a prefill step, a full batch
    assert choice.measure_order(rows, ["1", "256", "32", "2"])[:3] == [4, 8, 16]  # a second pass goes on
    assert choice.measure_order([1, 2, 4], ["1"]) == [2, 4, 1]


def test_a_budget_that_runs_out_still_times_decode_then_prefill(compiled_ops: Ops) -> None:
    """A large model's share of the budget can be gone after one row count: each pass then times
    one more, decode first, then a prefill step, never only the decode sizes."""
    w = compiled_ops.pack_linear_weight(torch.randn(64, 96).bfloat16())
    first = choice.measure(compiled_ops, w, choice.buckets(512), deadline=0.0, names=["own"])
    assert list(first) == ["1"]
    second = choice.measure(compiled_ops, w, choice.buckets(512), deadline=0.0, before=first, names=["own"])
    assert sorted(second, key=int) == ["1", "256"] and second["1"] == first["1"]


def test_later_starts_time_the_row_counts_a_first_start_ran_out_of_budget_for(
        compiled_ops: Ops, counted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A large model's first start can time only some row counts (TinyLlama-1.1B's gate|up had no
    prefill size but 256). Each later start goes on from the cached ones, within its own budget, and
    once every row count has a timing, starts measure nothing. Row counts timed beside a busy process
    serve that start but are not cached."""
    started_from: list[list[str]] = []

    def two_per_pass(ops: Ops, w: object, rows: list[int], deadline: float, before: dict | None,
                     names: object) -> dict[str, dict[str, float]]:
        out = dict(before or {})
        started_from.append(sorted(out, key=int))
        for m in choice.measure_order(rows, out)[:2]:  # the budget runs out after two row counts
            out[str(m)] = {"own": 1.0, "torch-bf16": 0.5 if m >= 64 else 2.0}
        return out

    monkeypatch.setattr(choice, "measure", two_per_pass)
    w = compiled_ops.pack_linear_weight(torch.randn(64, 96).bfloat16())
    path = choice.cache_path(choice.table_key(compiled_ops))

    def cached() -> list[str]:
        return sorted(json.loads(path.read_text())["data"]["shapes"]["64x96"]["timings"], key=int)

    wanted = [str(rows) for rows in choice.buckets(512)]  # 1 ... 512: ten row counts
    first = choice.choose(compiled_ops, [(w, 512)])
    assert first.source == "measured" and len(cached()) == 2 * choice.PASSES < len(wanted)
    assert first.plan(w) == [(1, "own")]  # torch wins from 256 rows (64 and 128 not timed yet), to confirm

    monkeypatch.setattr(cpu_load, "read_cpu", QuietThenBusy(others=1.0).read)  # a busy start
    before = cached()
    busy = choice.choose(compiled_ops, [(w, 512)])
    assert busy.source == "completed cache" and started_from[-choice.PASSES] == before
    assert len(busy.shapes["64x96"]) == len(before) + 2 * choice.PASSES  # used by this start ...
    assert cached() == before  # ... and not cached

    monkeypatch.setattr(cpu_load, "read_cpu", QuietThenBusy().read)
    starts = 0
    while cached() != wanted:
        table = choice.choose(compiled_ops, [(w, 512)])
        starts += 1
        assert table.source == "completed cache" and starts < len(wanted)
    assert started_from[-1][0] == "1"  # each went on from what was cached, never from nothing
    assert table.plan(w) == [(1, "own")]  # the second form waits for one more start's timing ...
    confirmed = choice.choose(compiled_ops, [(w, 512)])
    assert confirmed.plan(w) == [(1, "own"), (64, "torch-bf16")]  # ... from the row count it wins at
    calls = len(started_from)
    assert choice.choose(compiled_ops, [(w, 512)]).source == "cache" and len(started_from) == calls
    assert choice.choose(compiled_ops, [(w, 128)]).source == "cache"  # fewer rows: nothing to add


def test_a_second_weight_copy_is_kept_only_when_a_later_start_times_it_faster_too(
        compiled_ops: Ops, counted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow phase of the host can last through one start's measuring, unseen by the CPU counters
    (the dot-product kernel at 507-637 instead of ~800 GFLOP/s once chose torch from 256 rows at 1.11x):
    a second form is used only after the next start times its rows again, the best of both starts."""
    own_at_prefill = [1.2]  # seconds per call from 64 rows on; torch takes 1.0 there, own 0.5 below

    def fake(ops: Ops, w: object, rows: list[int], deadline: float, before: dict | None,
             names: object) -> dict[str, dict[str, float]]:
        counted.append(",".join(map(str, rows)))
        out = {k: dict(v) for k, v in (before or {}).items()}
        for m in rows:
            now = {"own": own_at_prefill[0] if m >= 64 else 0.5, "torch-bf16": 1.0 if m >= 64 else 3.0}
            out[str(m)] = {n: min(t, out.get(str(m), {}).get(n, t)) for n, t in now.items()}
        return out

    monkeypatch.setattr(choice, "measure", fake)
    w = compiled_ops.pack_linear_weight(torch.randn(64, 96).bfloat16())
    assert choice.choose(compiled_ops, [(w, 256)]).plan(w) == [(1, "own")]  # torch 1.2x: to confirm
    own_at_prefill[0] = 0.9  # the next start, in a normal phase: own is the faster after all
    counted.clear()
    again = choice.choose(compiled_ops, [(w, 256)])
    assert counted and all(rows == "64,128,256" for rows in counted)  # only the second form's rows
    assert again.plan(w) == [(1, "own")] and choice.choose(compiled_ops, [(w, 256)]).source == "cache"
    assert choice.choose(compiled_ops, [(w, 256)]).plan(w) == [(1, "own")]

    own_at_prefill[0] = 2.0  # another model shape where torch really is twice as fast
    w2 = compiled_ops.pack_linear_weight(torch.randn(64, 128).bfloat16())
    assert choice.choose(compiled_ops, [(w2, 256)]).plan(w2) == [(1, "own")]
    assert choice.choose(compiled_ops, [(w2, 256)]).plan(w2) == [(1, "own"), (64, "torch-bf16")]
    assert choice.choose(compiled_ops, [(w2, 256)]).source == "cache"
