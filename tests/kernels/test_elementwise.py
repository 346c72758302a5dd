"""RMS norm, SwiGLU, KV writes and the greedy argmax against plain torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import Ops


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()).float()


@pytest.mark.parametrize(("rows", "hidden"), [(1, 576), (3, 100), (40, 17), (2, 4096)])
def test_rms_norm(ops: Ops, rows: int, hidden: int) -> None:
    torch.manual_seed(rows + hidden)
    x, w, res = torch.randn(rows, hidden), torch.randn(hidden), torch.randn(rows, hidden)
    normed, total = ops.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(normed, rms(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    assert total is x
    x_before, res_before = x.clone(), res.clone()
    normed, total = ops.rms_norm(x, w, 1e-6, res)
    torch.testing.assert_close(total, x + res)
    torch.testing.assert_close(normed, rms(x + res, w, 1e-6), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before) and torch.equal(res, res_before)


def test_rms_norm_shapes_and_dtypes(ops: Ops) -> None:
    x, w = torch.randn(2, 3, 64), torch.randn(64).bfloat16()
    normed, _ = ops.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(normed, rms(x, w.float(), 1e-5), rtol=1e-5, atol=1e-5)
    normed16, total16 = ops.rms_norm(x.bfloat16(), w, 1e-5, x.bfloat16())
    assert normed16.dtype == total16.dtype == torch.bfloat16 and normed16.shape == (2, 3, 64)


@pytest.mark.parametrize(("rows", "vocab"), [(1, 49152), (16, 49152), (3, 37), (70, 1000), (2, 15)])
def test_argmax_rows_is_torch_argmax(ops: Ops, threads: int, rows: int, vocab: int) -> None:
    torch.manual_seed(rows * vocab)
    x = torch.randn(rows, vocab)
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))


def test_argmax_rows_ties_infinities_and_nans_as_torch(ops: Ops) -> None:
    """The first of equal maxima wins, whichever vector lane holds it; NaN counts as the largest."""
    x = torch.randn(9, 100)
    x[0, [3, 40, 77]] = 9.0                                # a tie across lanes and vectors: 3
    x[1, [51, 19]] = 9.0                                   # 19, in an earlier vector than 51
    x[2] = float("-inf")                                   # nothing larger than -inf: 0
    x[3, 98] = float("inf")
    x[4, [60, 61]] = float("inf")
    x[5, 70], x[5, 10] = float("nan"), 50.0                # a NaN beats everything, even a later one
    x[6, [20, 90]] = float("nan")
    x[7] = 0.0                                             # all equal: 0
    x[8, 99] = 9.0                                         # the last element, in a partial vector
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    wide = torch.randn(4, 2 * 49152)[:, ::2]               # rows with a stride: copied, same answer
    assert torch.equal(ops.argmax_rows(wide), wide.argmax(dim=-1))


@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (5, 33), (300, 256)])
def test_silu_and_mul(ops: Ops, rows: int, inter: int) -> None:
    torch.manual_seed(rows)
    x = torch.randn(rows, 2 * inter) * 4
    want = F.silu(x[:, :inter].double()) * x[:, inter:].double()
    torch.testing.assert_close(ops.silu_and_mul(x), want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.silu_and_mul(x.view(1, rows, -1)), want.float().view(1, rows, -1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_write_kv(ops: Ops, dtype: torch.dtype) -> None:
    k_cache = torch.zeros(6, 16, 3, 64, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(5, 3, 64), torch.randn(5, 3, 64)
    slots = torch.tensor([0, 17, 31, 95, 40])
    ops.write_kv(k, v, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[slot // 16, slot % 16], k[t].to(dtype))
        assert torch.equal(v_cache[slot // 16, slot % 16], v[t].to(dtype))
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 5


def test_write_kv_into_a_permuted_cache(ops: Ops) -> None:
    # [blocks, heads, block_size, dim] storage viewed as [blocks, block_size, heads, dim]
    storage = torch.zeros(4, 2, 8, 32)
    k_cache, v_cache = storage.transpose(1, 2), torch.zeros(4, 8, 2, 32)
    k = torch.randn(3, 2, 32)
    ops.write_kv(k, k, k_cache, v_cache, torch.tensor([3, 9, 31]))
    assert torch.equal(k_cache[1, 1], k[1]) and torch.equal(storage[3, :, 7], k[2])


def test_write_kv_rounds_like_torch(ops: Ops) -> None:
    # Ties to even, values just above ties, NaN, inf, denormals and a bf16 input passed through.
    values = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, float("nan"), float("inf"),
                           -float("inf"), 1e-40, -3.3e38, 0.0, -0.0, 65504.0, 2.0**-133] + [0.1] * 4)
    k = values.repeat(3).view(3, 1, 16)
    k_cache = torch.zeros(2, 2, 1, 16, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    ops.write_kv(k, k.bfloat16(), k_cache, v_cache, torch.tensor([0, 3, 1]))
    want = k.bfloat16().view(torch.int16)
    assert torch.equal(k_cache.view(-1, 16)[[0, 3, 1]].view(torch.int16), want.view(3, 16))
    assert torch.equal(v_cache.view(-1, 16)[[0, 3, 1]].view(torch.int16), want.view(3, 16))


def test_write_kv_from_bf16_into_fp32(ops: Ops) -> None:
    k = torch.randn(4, 2, 32).bfloat16()
    cache = torch.zeros(3, 4, 2, 32)
    ops.write_kv(k, k, cache, cache, torch.tensor([11, 0, 5, 6]))
    assert torch.equal(cache.view(-1, 2, 32)[[11, 0, 5, 6]], k.float())


def test_write_kv_refuses_slots_outside_the_cache(compiled_ops: Ops) -> None:
    cache = torch.zeros(2, 4, 1, 16)
    k = torch.randn(1, 1, 16)
    for slot in (-1, 8):
        with pytest.raises(ValueError, match="outside the cache"):
            compiled_ops.write_kv(k, k, cache, cache, torch.tensor([slot]))


def rope_oracle(x: torch.Tensor, pos: torch.Tensor, rot: int, neox: bool, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding from first principles in float64 (as HF's rotate_half / GPT-J's pairs)."""
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x = x.double().clone()
    if neox:
        x1, x2 = x[..., :rot // 2].clone(), x[..., rot // 2:rot].clone()
        x[..., :rot // 2], x[..., rot // 2:rot] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    else:
        x1, x2 = x[..., 0:rot:2].clone(), x[..., 1:rot:2].clone()
        x[..., 0:rot:2], x[..., 1:rot:2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return x.float()


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(("tokens", "head_dim", "rot"), [(1, 64, 64), (37, 64, 64), (5, 80, 32), (300, 128, 128),
                                                         (3, 16, 8)])
def test_rotary_embedding_in_place_on_strided_views(ops: Ops, neox: bool, tokens: int, head_dim: int, rot: int) -> None:
    torch.manual_seed(tokens)
    hq, hk, max_pos = 9, 3, 4096
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim)  # q and k are views into one fused output
    q = qkv[:, :hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim:(hq + hk) * head_dim].view(tokens, hk, head_dim)
    v_before = qkv[:, (hq + hk) * head_dim:].clone()
    pos = torch.randint(0, max_pos, (tokens,))
    want_q, want_k = rope_oracle(q, pos, rot, neox), rope_oracle(k, pos, rot, neox)
    inv = 1.0 / 10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    ops.rotary_embedding(pos, q, k, ang.cos().float(), ang.sin().float(), rot, neox)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, (hq + hk) * head_dim:], v_before)  # v untouched
