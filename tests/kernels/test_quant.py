"""Quantized linear layers: the compiled kernel against dequantize-then-matmul, and the layouts."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels import Ops, ReferenceOps
from lmserve.kernels.quant import (
    Grouped,
    QuantLinear,
    concat,
    dequantize_packed,
    int8_group,
    pack_quant,
    quantize,
    quantize_activations,
    quantize_int4,
    quantize_int8,
    to_vnni,
)


def oracle(x: torch.Tensor, g: Grouped, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(W)^T + bias`` in float64: what every layout must compute."""
    y = x.double() @ g.dequantize().double().T
    return (y if bias is None else y + bias.double()).float()


def close(actual: torch.Tensor, want: torch.Tensor, k: int) -> None:
    torch.testing.assert_close(actual, want, rtol=1e-4, atol=5e-6 * k)


def q6k_like(n: int, k: int) -> Grouped:
    """A Q6_K-shaped weight: int8 values in [-32, 31], one scale per 16."""
    return Grouped(torch.randint(-32, 32, (n, k), dtype=torch.int8), torch.rand(n, k // 16) * 0.02, None, 8, 16)


FORMATS = {
    "int8": lambda w: quantize_int8(w),
    "int4": lambda w: quantize_int4(w),
    "q6k-like": lambda w: q6k_like(*w.shape),
    "int4+q6k-mixed": lambda w: concat([quantize_int4(w[: w.shape[0] // 2]), q6k_like(w.shape[0] - w.shape[0] // 2,
                                                                                      w.shape[1])]),
}
# M: 1 (decode), 3 (split accumulators), 13 (more than one 8-row tile), 150 (several row tasks);
# N: ragged panel tails; K: one group, several groups, more than one 512-wide K block.
SHAPES = [(1, 70, 96), (3, 33, 512), (13, 130, 1056), (150, 31, 64), (1, 576, 1536)]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_linear_matches_dequantize_then_matmul(ops: Ops, fmt: str, m: int, n: int, k: int) -> None:
    torch.manual_seed(m + n + k)
    g = FORMATS[fmt](torch.randn(n, k))
    x, bias = torch.randn(m, k), torch.randn(n)
    packed = pack_quant(g)
    close(ops.linear(x, packed), oracle(x, g), k)
    close(ops.linear(x, packed, bias), oracle(x, g, bias), k)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4+q6k-mixed"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 70, 96), (13, 40, 544)])
def test_gate_up_matches_silu_of_the_two_halves(ops: Ops, fmt: str, m: int, n: int, k: int) -> None:
    torch.manual_seed(m * n)
    gate, up = FORMATS[fmt](torch.randn(n, k)), FORMATS[fmt](torch.randn(n, k))
    x = torch.randn(m, k)
    packed = pack_quant(concat([gate, up]), n, gate_up=True)
    want = torch.nn.functional.silu(oracle(x, gate).double()) * oracle(x, up).double()
    close(ops.linear_silu_mul(x, packed), want.float(), k)


def test_kernel_splits_work_by_thread_count(compiled_ops: Ops, threads: int) -> None:
    torch.manual_seed(threads)
    for m, n, k in [(1, 64, 576), (5, 300, 576), (100, 320, 96)]:
        g, x = quantize_int4(torch.randn(n, k)), torch.randn(m, k)
        close(compiled_ops.linear(x, pack_quant(g)), oracle(x, g), k)


def test_kernel_agrees_with_reference_ops_on_leading_dims_and_bf16_input(compiled_ops: Ops) -> None:
    torch.manual_seed(1)
    packed = pack_quant(quantize_int8(torch.randn(48, 64)))
    x = torch.randn(2, 3, 64).bfloat16()
    got, want = compiled_ops.linear(x, packed), ReferenceOps().linear(x, packed)
    assert got.shape == (2, 3, 48) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantization_error_is_at_most_half_a_step(mode: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different sizes
    g = quantize(w, mode)
    step = g.scale.repeat_interleave(g.group, dim=1)
    assert ((g.dequantize() - w).abs() <= step * 0.5 + 1e-6 * w.abs()).all()
    assert int(g.q.min()) >= (-127 if mode == "int8" else 0) and int(g.q.max()) <= (127 if mode == "int8" else 15)


def test_a_constant_group_is_exact() -> None:
    w = torch.full((2, 64), 0.25)
    w[1] = 0.0
    for mode in ("int8", "int4"):
        assert torch.equal(quantize(w, mode).dequantize(), w)


def test_mixed_parts_widen_without_changing_values() -> None:
    torch.manual_seed(2)
    a, b = quantize_int4(torch.randn(5, 64)), q6k_like(7, 64)
    merged = concat([a, b])
    assert (merged.bits, merged.group, merged.min is not None) == (8, 16, True)
    assert torch.equal(merged.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_packed_bytes_are_a_fraction_of_bf16(mode: str) -> None:
    packed = pack_quant(quantize(torch.randn(576, 1536), mode))
    bf16 = 576 * 1536 * 2
    assert isinstance(packed, QuantLinear)
    # int8: 1 byte + 4/128 of scale (1536 features: groups of 128); int4: half a byte + 8/32 of scale and min
    assert packed.nbytes == pytest.approx(bf16 * (0.515625 if mode == "int8" else 0.375), rel=1e-6)


def test_int8_groups_are_the_largest_that_divide_the_features() -> None:
    """Fewer groups mean fewer scales to read and to apply per multiply-add: the own int8 takes the
    largest group of ``INT8_GROUPS`` that divides K, and 32 when none does (as before)."""
    assert [int8_group(k) for k in (1536, 5632, 576, 96, 48)] == [128, 128, 64, 32, 32]
    assert quantize_int8(torch.randn(8, 576)).group == 64
    assert quantize_int8(torch.randn(8, 576), group=32).group == 32


def test_packing_round_trips_the_grouped_form() -> None:
    torch.manual_seed(3)
    for g in (quantize_int8(torch.randn(45, 96)), quantize_int4(torch.randn(45, 96)), q6k_like(45, 96)):
        assert torch.equal(dequantize_packed(pack_quant(g)), g.dequantize())


# -- the VNNI layouts: 8- and 4-bit weights x int8-rounded activations ------------------------------------
def vnni_oracle(x: torch.Tensor, g: Grouped, bias: torch.Tensor | None = None) -> torch.Tensor:
    return oracle(quantize_activations(x, g.group), g, bias)


# M: 13 and 150 end in partial row tiles at both tile heights (6 rows in 8 bits, 8 in 4); 150 also
# spans two row tasks, whose tiles from 32 rows on do not prefetch.
@pytest.mark.parametrize("fmt", ["int8", "q6k-like", "int4"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 70, 96), (3, 33, 512), (13, 130, 1056), (150, 40, 256)])
def test_vnni_layout_matches_dequantize_then_matmul_of_rounded_activations(ops: Ops, fmt: str, m: int, n: int,
                                                                          k: int) -> None:
    torch.manual_seed(m + n)
    g = FORMATS[fmt](torch.randn(n, k))
    x, bias = torch.randn(m, k), torch.randn(n)
    packed = to_vnni(pack_quant(g))
    assert packed.layout in ("q8v", "q4v") and torch.equal(dequantize_packed(packed), g.dequantize())
    close(ops.linear(x, packed, bias), vnni_oracle(x, g, bias), k)
    gate_up = to_vnni(pack_quant(concat([g, g]), n, gate_up=True))
    want = torch.nn.functional.silu(vnni_oracle(x, g).double()) * vnni_oracle(x, g).double()
    close(ops.linear_silu_mul(x, gate_up), want.float(), k)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_vnni_activations_round_halves_to_even_as_the_reference(ops: Ops, fmt: str) -> None:
    """Activations exactly halfway between two int8 steps (max 127, so the step is 1) round to the
    even neighbour, as ``quantize_activations``; one off by a step moves y by a whole weight."""
    torch.manual_seed(7)
    g = FORMATS[fmt](torch.randn(64, 96))
    halves = torch.arange(-47.5, 48.5, 1.0)  # 96 values, every one a tie
    x = torch.stack([halves, -halves.flip(0), halves.roll(5)])
    x[:, 0::32] = 127.0  # each group of 32 has max |x| = 127: the scale is exactly 1
    assert torch.equal(quantize_activations(x, 32), torch.round(x))
    close(ops.linear(x, to_vnni(pack_quant(g))), vnni_oracle(x, g), 96)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_vnni_results_stay_within_activation_rounding_of_weight_only(compiled_ops: Ops, mode: str) -> None:
    torch.manual_seed(4)
    g, x = quantize(torch.randn(256, 576), mode), torch.randn(8, 576)
    exact = oracle(x, g)
    err = (compiled_ops.linear(x, to_vnni(pack_quant(g))) - exact).abs().max() / exact.abs().max()
    assert float(err) < 0.02


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_vnni_layout_packed_elsewhere_runs_without_vnni(compiled_ops: Ops, monkeypatch: pytest.MonkeyPatch,
                                                        mode: str) -> None:
    monkeypatch.setattr(compiled_ops, "dot_layouts", ())
    g, x = quantize(torch.randn(40, 64), mode), torch.randn(2, 64)
    close(compiled_ops.linear(x, to_vnni(pack_quant(g))), vnni_oracle(x, g), 64)


def test_vnni_layouts_are_taken_by_int8_without_mins_and_4_bit() -> None:
    assert to_vnni(pack_quant(quantize_int8(torch.randn(32, 64)))).layout == "q8v"
    assert to_vnni(pack_quant(quantize_int4(torch.randn(32, 64)))).layout == "q4v"
    mixed = pack_quant(concat([quantize_int4(torch.randn(32, 64)), q6k_like(32, 64)]))  # 8-bit with mins
    assert to_vnni(mixed).layout == "q8"
    only_4_bit = ("q4v",)  # what the AVX2 build multiplies
    assert to_vnni(pack_quant(quantize_int8(torch.randn(32, 64))), only_4_bit).layout == "q8"
    assert to_vnni(pack_quant(quantize_int4(torch.randn(32, 64))), only_4_bit).layout == "q4v"
