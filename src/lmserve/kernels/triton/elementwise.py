"""RMS norm (with the residual add) and rotary embedding as one Triton kernel each.

In torch each is eight to ten small kernels per call, and a decode step of a small model is mostly
such calls: fusing them cuts the kernels a CUDA graph replays per layer by about two thirds. The
semantics are ``ReferenceOps.rms_norm`` and ``ReferenceOps.rotary_embedding`` exactly: float32
arithmetic on values rounded as torch rounds them (the residual sum is rounded to ``x``'s dtype
before it is normalised, as the reference normalises the stored sum).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


def _rms_norm_fn(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps, stride_x, stride_r, stride_o, stride_s,
                 HAS_RES: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        total = x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        stored = total.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, stored, mask=ok)
        t32 = stored.to(tl.float32)
    else:
        t32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(t32 * t32, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (t32 * inv * w).to(out_ptr.dtype.element_ty), mask=ok)


def _rotary_fn(pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, num_q_heads, num_k_heads, stride_qt, stride_qh,
               stride_kt, stride_kh, stride_cos, HALF: tl.constexpr, NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_R: tl.constexpr):  # type: ignore[no-untyped-def]
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    i = tl.arange(0, BLOCK_R)
    i_ok = i < HALF
    c = tl.load(cos_ptr + pos * stride_cos + i, mask=i_ok, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + i, mask=i_ok, other=0.0)[None, :]
    if NEOX:
        first, second = i, i + HALF
    else:
        first, second = 2 * i, 2 * i + 1
    h = tl.arange(0, BLOCK_H)
    for which in tl.static_range(2):  # q, then k
        if which == 0:
            base, heads, st, sh = q_ptr, num_q_heads, stride_qt, stride_qh
        else:
            base, heads, st, sh = k_ptr, num_k_heads, stride_kt, stride_kh
        ok = (h < heads)[:, None] & i_ok[None, :]
        row = base + tok * st + h[:, None] * sh
        x1 = tl.load(row + first[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(row + second[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(row + first[None, :], (x1 * c - x2 * s).to(base.dtype.element_ty), mask=ok)
        tl.store(row + second[None, :], (x2 * c + x1 * s).to(base.dtype.element_ty), mask=ok)


_rms_norm: Any = triton.jit(_rms_norm_fn)
_rotary: Any = triton.jit(_rotary_fn)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``ReferenceOps.rms_norm``: ``(rms_norm(x + residual) * weight, x + residual)``."""
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    res2 = None if residual is None else residual.reshape(-1, n)
    if res2 is not None and res2.stride(-1) != 1:
        res2 = res2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if res2 is not None else x2
    if x2.shape[0]:
        r = res2 if res2 is not None else x2
        _rms_norm[(x2.shape[0],)](x2, r, weight, out, total, n, eps, x2.stride(0), r.stride(0), out.stride(0),
                                  total.stride(0), HAS_RES=res2 is not None, BLOCK=triton.next_power_of_2(n))
    return out.view(shape), (total.view(shape) if res2 is not None else x)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, rotary_dim: int, neox_style: bool) -> None:
    """See ``ReferenceOps.rotary_embedding``: rotates ``q[T, Hq, D]`` and ``k[T, Hk, D]`` in place."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError("rotary_embedding needs q, k and the tables contiguous in their last dimension")
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    _rotary[(num_tokens,)](positions, q, k, cos, sin, q.shape[1], k.shape[1], q.stride(0), q.stride(1),
                           k.stride(0), k.stride(1), cos.stride(0), HALF=half, NEOX=neox_style,
                           BLOCK_H=triton.next_power_of_2(max(q.shape[1], k.shape[1])),
                           BLOCK_R=triton.next_power_of_2(half))
