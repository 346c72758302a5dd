"""The fused SwiGLU projection computes what the projection and ``silu_and_mul`` compute apart."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import Ops, ReferenceOps, get_ops
from lmserve.parallel.layers import ColumnParallelLinear, GateUpSwiGLU, LinearBase
from lmserve.parallel.state import ParallelState

OPS = {"device": get_ops("cpu"), "reference": ReferenceOps("cpu")}


def _loaded(layer: LinearBase, gate: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None) -> LinearBase:
    for part, w in enumerate((gate, up)):
        layer.weight.weight_loader(layer.weight, w, part)  # type: ignore[attr-defined]
        if bias is not None:
            assert layer.bias is not None
            layer.bias.weight_loader(layer.bias, bias[part], part)  # type: ignore[attr-defined]
    return layer


def _unfused(ops: Ops, gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
             state: ParallelState, bias: torch.Tensor | None = None) -> torch.Tensor:
    plain = _loaded(ColumnParallelLinear(gate.shape[1], [gate.shape[0]] * 2, bias is not None, dtype, state),
                    gate, up, bias)
    plain.finalize(ops)
    return ops.silu_and_mul(plain(x))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("rank", [0, 1])
def test_fp32_weights_give_exactly_the_unfused_result(name: str, rank: int) -> None:
    ops, state = OPS[name], ParallelState(rank, 2)
    torch.manual_seed(rank)
    gate, up, x = torch.randn(96, 64), torch.randn(96, 64), torch.randn(5, 64)
    fused = _loaded(GateUpSwiGLU(64, 96, dtype=torch.float32, state=state), gate, up)
    fused.finalize(ops)
    got = fused(x)
    assert got.shape == (5, 48)
    assert torch.equal(got, _unfused(ops, gate, up, x, torch.float32, state))


@pytest.mark.parametrize("name", OPS)
def test_bf16_weights_match_the_unfused_result(name: str) -> None:
    ops, state = OPS[name], ParallelState(0, 1)
    torch.manual_seed(7)
    gate, up, x = torch.randn(100, 576).bfloat16(), torch.randn(100, 576).bfloat16(), torch.randn(9, 576) / 24
    fused = _loaded(GateUpSwiGLU(576, 100, dtype=torch.bfloat16, state=state), gate, up)
    fused.finalize(ops)
    assert fused.packed is not None and fused.packed.gate_up
    torch.testing.assert_close(fused(x), _unfused(ops, gate, up, x, torch.bfloat16, state), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", OPS)
def test_with_a_bias_it_projects_then_multiplies(name: str) -> None:
    ops, state = OPS[name], ParallelState(0, 1)
    torch.manual_seed(8)
    gate, up, x, bias = torch.randn(40, 32), torch.randn(40, 32), torch.randn(3, 32), torch.randn(2, 40)
    fused = _loaded(GateUpSwiGLU(32, 40, bias=True, dtype=torch.float32, state=state), gate, up, bias)
    fused.finalize(ops)
    want = F.silu(x @ gate.T + bias[0]) * (x @ up.T + bias[1])
    torch.testing.assert_close(fused(x), want)
    assert torch.equal(fused(x), _unfused(ops, gate, up, x, torch.float32, state, bias))


def test_a_packed_weight_of_another_kind_is_refused() -> None:
    ops = OPS["device"]
    gate, up = torch.randn(32, 16).bfloat16(), torch.randn(32, 16).bfloat16()
    fused = GateUpSwiGLU(16, 32, dtype=torch.bfloat16)
    plain = ColumnParallelLinear(16, [32, 32], dtype=torch.bfloat16)
    assert fused.fits(ops.pack_gate_up_weight(gate, up)) and not plain.fits(ops.pack_gate_up_weight(gate, up))
    assert plain.fits(ops.pack_linear_weight(torch.cat([gate, up])))
    with pytest.raises(ValueError, match="does not fit this GateUpSwiGLU"):
        fused.restore_packed(ops.pack_linear_weight(torch.cat([gate, up])))
