"""Packed-weight linear layers against fp32 matmuls of the same bf16-rounded weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import Ops, candidates
from lmserve.kernels.packed import PackedLinear, interleave_gate_up, pack_pairs, pack_panels


def expected(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # The kernels store weights in bf16 and compute in fp32; the oracle does the same in float64.
    return (x.double() @ w.bfloat16().double().T).float()


def close(actual: torch.Tensor, want: torch.Tensor, k: int) -> None:
    # fp32 accumulation in another order: error grows with the length of the dot products.
    torch.testing.assert_close(actual, want, rtol=1e-4, atol=2e-6 * k)


# M: 1, a partial 12-row tile, several tasks of 192 rows; N: panels of 32 with ragged tails;
# K: odd sizes and more than one K block (512 features for one row tile, 1024 for more).
SHAPES = [(1, 576, 576), (1, 192, 576), (3, 33, 100), (12, 64, 64), (13, 1, 7), (25, 100, 1536),
          (64, 1536, 576), (200, 31, 1100), (400, 96, 64)]


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_linear_matches_fp32_matmul(ops: Ops, m: int, n: int, k: int) -> None:
    torch.manual_seed(m * 7 + n + k)
    w = torch.randn(n, k).bfloat16()
    x = torch.randn(m, k)
    close(ops.linear(x, ops.pack_linear_weight(w)), expected(x, w), k)


def test_linear_splits_work_by_thread_count(ops: Ops, threads: int) -> None:
    torch.manual_seed(threads)
    for m, n, k in [(1, 64, 576), (5, 1536, 576), (250, 320, 96)]:
        w, x = torch.randn(n, k).bfloat16(), torch.randn(m, k)
        close(ops.linear(x, ops.pack_linear_weight(w)), expected(x, w), k)


def test_threads_sharing_column_blocks_give_the_same_bits(compiled_ops: Ops) -> None:
    """From 64 rows, or from 4M weights at any row count, the GEMMs deal column blocks out to the
    threads, and a thread done with its own takes the others' last ones: each block must run exactly
    once, whoever runs it, so every thread count gives the bits of one thread (5 threads on fewer
    cores take each other's blocks most)."""
    torch.manual_seed(5)
    w, gate, up = torch.randn(700, 200).bfloat16(), torch.randn(350, 200).bfloat16(), torch.randn(350, 200).bfloat16()
    big = torch.randn(4100, 1024).bfloat16()  # shared from one row
    cases = [(300, compiled_ops.pack_linear_weight(w)), (300, compiled_ops.pack_gate_up_weight(gate, up)),
             (5, compiled_ops.pack_linear_weight(big))]
    if candidates.unavailable("own-dot", compiled_ops) is None:  # the dot-product kernel, where it runs
        cases += [(300, PackedLinear(pack_pairs(w), 700, 200, layout="pair32")),
                  (300, PackedLinear(pack_pairs(interleave_gate_up(gate, up)), 350, 200, layout="pair32",
                                     gate_up=True)),
                  (5, PackedLinear(pack_pairs(big), 4100, 1024, layout="pair32"))]
    xs = {300: torch.randn(300, 200), 5: torch.randn(5, 1024)}  # by row count

    def outputs() -> list[torch.Tensor]:
        return [compiled_ops.linear_silu_mul(xs[m], p) if p.gate_up else compiled_ops.linear(xs[m], p)
                for m, p in cases]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = outputs()
        for n in (2, 3, 5):
            torch.set_num_threads(n)
            for _ in range(4):
                for got, ref in zip(outputs(), want, strict=True):
                    assert torch.equal(got, ref), f"{n} threads"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [9, 40])  # 40: the AVX2 build's 6-row half tiles, then a 4-row rest
def test_bias(ops: Ops, rows: int) -> None:
    torch.manual_seed(1)
    w, x = torch.randn(70, 576).bfloat16(), torch.randn(rows, 576)
    bias = torch.randn(70)
    packed = ops.pack_linear_weight(w)
    close(ops.linear(x, packed, bias), expected(x, w) + bias, 576)
    close(ops.linear(x, packed, bias.bfloat16()), expected(x, w) + bias.bfloat16().float(), 576)


def test_leading_dims_strides_and_dtypes(ops: Ops) -> None:
    torch.manual_seed(2)
    w = torch.randn(48, 64).bfloat16()
    packed = ops.pack_linear_weight(w)
    x = torch.randn(2, 5, 64)
    close(ops.linear(x, packed), expected(x.reshape(-1, 64), w).view(2, 5, 48), 64)
    wide = torch.randn(7, 100)
    view = wide[:, 10:74]  # rows with a stride longer than their length
    close(ops.linear(view, packed), expected(view, w), 64)
    y16 = ops.linear(x.bfloat16(), packed)
    assert y16.dtype == torch.bfloat16 and y16.shape == (2, 5, 48)


def test_fp32_weights(ops: Ops) -> None:
    torch.manual_seed(3)
    w, x = torch.randn(40, 96), torch.randn(4, 96)
    packed = ops.pack_linear_weight(w)
    # fp32 weights keep their precision on every backend: nothing rounds them to bf16 on the way.
    assert packed.data.dtype == torch.float32
    close(ops.linear(x, packed), (x.double() @ w.double().T).float(), 96)


def test_fused_projections_are_one_packed_concat(ops: Ops) -> None:
    torch.manual_seed(4)
    wq, wk, wv = torch.randn(576, 576).bfloat16(), torch.randn(192, 576).bfloat16(), torch.randn(192, 576).bfloat16()
    x = torch.randn(6, 576)
    q, k, v = ops.linear(x, ops.pack_linear_weight(torch.cat([wq, wk, wv]))).split([576, 192, 192], dim=-1)
    close(q, expected(x, wq), 576)
    close(k, expected(x, wk), 576)
    close(v, expected(x, wv), 576)


@pytest.mark.parametrize(("m", "inter", "k"), [(1, 1536, 576), (7, 40, 64), (30, 33, 100), (200, 64, 48)])
def test_linear_silu_mul(ops: Ops, m: int, inter: int, k: int) -> None:
    torch.manual_seed(m + inter)
    gate, up = torch.randn(inter, k).bfloat16(), torch.randn(inter, k).bfloat16()
    x = torch.randn(m, k) / k**0.5
    want = F.silu(expected(x, gate).double()) * expected(x, up).double()
    got = ops.linear_silu_mul(x, ops.pack_gate_up_weight(gate, up))
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5 * k)


def test_a_call_reads_nothing_an_earlier_larger_call_left(compiled_ops: Ops) -> None:
    """The compiled GEMMs keep their bf16-rounded activations and SwiGLU partial sums in per-thread
    buffers that only grow, without clearing them: a call after a larger one must read only what it
    wrote itself. Non-finite leftovers would show: times a zero-padded weight they give NaN."""
    layouts = [("panel32", pack_panels)]
    if candidates.unavailable("own-dot", compiled_ops) is None:
        layouts.append(("pair32", pack_pairs))
    torch.manual_seed(11)
    for layout, pack in layouts:
        big, gate_big, up_big = (torch.randn(96, 1201).bfloat16() for _ in range(3))
        junk = torch.full((300, 1201), float("nan"))
        compiled_ops.linear(junk, PackedLinear(pack(big), 96, 1201, layout=layout))
        compiled_ops.linear_silu_mul(junk, PackedLinear(pack(interleave_gate_up(gate_big, up_big)), 96, 1201,
                                                        layout=layout, gate_up=True))
        w, gate, up = torch.randn(33, 101).bfloat16(), torch.randn(40, 101).bfloat16(), torch.randn(40, 101).bfloat16()
        x = torch.randn(7, 101)
        # The dot-product kernel rounds activations to bf16 (nearest even) first, as x.bfloat16() does.
        xr = x.bfloat16().float() if layout == "pair32" else x
        close(compiled_ops.linear(x, PackedLinear(pack(w), 33, 101, layout=layout)), expected(xr, w), 101)
        got = compiled_ops.linear_silu_mul(x, PackedLinear(pack(interleave_gate_up(gate, up)), 40, 101, layout=layout,
                                                           gate_up=True))
        want = F.silu(expected(xr, gate).double()) * expected(xr, up).double()
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5 * 101, msg=layout)


def test_gate_up_weights_only_go_to_linear_silu_mul(ops: Ops) -> None:
    w = torch.randn(32, 16)
    with pytest.raises(ValueError, match="linear_silu_mul"):
        ops.linear(torch.randn(2, 16), ops.pack_gate_up_weight(w, w))
    with pytest.raises(ValueError, match="pack_gate_up_weight"):
        ops.linear_silu_mul(torch.randn(2, 16), ops.pack_linear_weight(w))
    with pytest.raises(ValueError, match="same shape"):
        ops.pack_gate_up_weight(w, w[:8])


def test_packed_weight_keeps_its_shape(ops: Ops) -> None:
    packed = ops.pack_linear_weight(torch.randn(33, 100).bfloat16())
    assert (packed.out_features, packed.in_features) == (33, 100)
    assert packed.data.dtype in (torch.bfloat16, torch.float32)


def test_empty_batch(ops: Ops) -> None:
    packed = ops.pack_linear_weight(torch.randn(40, 64).bfloat16())
    assert ops.linear(torch.randn(0, 64), packed).shape == (0, 40)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (33, 7), (64, 96), (700, 201)])
def test_compiled_packing_writes_the_reference_layouts(compiled_ops: Ops, n: int, k: int, threads: int) -> None:
    """The compiled packing (panels, pairs, gate|up pairs, panels re-laid as pairs) writes the bytes of
    the torch layouts in kernels/packed.py, padding included, from strided rows too."""
    ext = compiled_ops.ext  # type: ignore[attr-defined]
    torch.manual_seed(n + k)
    w, up = torch.randn(n, k).bfloat16(), torch.randn(n, k).bfloat16()
    assert torch.equal(ext.pack_linear(w, False, None, threads), pack_panels(w))
    assert torch.equal(ext.pack_linear(w, True, None, threads), pack_pairs(w))
    assert torch.equal(ext.pack_linear(w, False, up, threads), pack_panels(interleave_gate_up(w, up)))
    assert torch.equal(ext.pack_linear(w, True, up, threads), pack_pairs(interleave_gate_up(w, up)))
    assert torch.equal(ext.panels_to_pairs(pack_panels(w), threads), pack_pairs(w))
    wider = torch.randn(n, k + 5).bfloat16()
    for view in (wider[:, :k], wider[:, 5:], torch.randn(n, 2 * k).bfloat16()[:, ::2]):  # row and column strides
        assert torch.equal(ext.pack_linear(view, False, None, threads), pack_panels(view.contiguous()))
    # what the layers and the dot-product candidate get
    assert torch.equal(compiled_ops.pack_linear_weight(w).data, pack_panels(w))
    gate_up = compiled_ops.pack_gate_up_weight(w, up)
    assert torch.equal(gate_up.data, pack_panels(interleave_gate_up(w, up)))
    assert torch.equal(candidates.CANDIDATES["own-dot"].prepare(gate_up).data, pack_pairs(interleave_gate_up(w, up)))
    with pytest.raises(ValueError, match="same shape"):
        compiled_ops.pack_gate_up_weight(w, torch.randn(n + 1, k).bfloat16())
