"""Paged attention as one Triton kernel: decodes, prefills and chunked prefills over the block
table, in the same call, with the semantics of ``ReferenceOps.paged_attention``.

Work split. A program owns one KV head and a tile of ``BLOCK_Q`` consecutive new tokens of one
sequence; its rows are (token, query head of that KV head's group) pairs, so grouped-query heads
share every key and value the program loads. A decode (one token) is one tile of ``group`` rows.
The grid is ``T // BLOCK_Q + S`` tiles per KV head (an upper bound on the tiles the ragged
sequences need, known without reading ``query_start_loc`` on the host); each program finds its
sequence by binary search over ``query_start_loc`` and exits when its tile is past the sequence's
end. No host synchronisation, so the kernel can be captured in a CUDA graph.

Keys are visited ``BLOCK_N`` positions at a time (several pages when the block size is smaller),
with an online softmax in float32. Arithmetic is float32 everywhere in the interpreter (its bf16
arithmetic is not IEEE bf16: only loads, stores and casts of bf16 are exact there); on a GPU the two
matrix products take bf16 operands and accumulate in float32, as flash attention does.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from lmserve.kernels.triton import interpreting


def _paged_attention_fn(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, ctx_ptr, qsl_ptr, slopes_ptr,
    num_seqs, scale,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_tab,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr,
    F32_DOT: tl.constexpr,
):  # type: ignore[no-untyped-def]
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    # The sequence owning this tile: the last s with qsl[s] // BLOCK_Q + s <= tile.
    lo: tl.int32 = 0  # typed: loop-carried values must keep one type when compiled
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    first_tok = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_tok < q_len:
        ctx = tl.load(ctx_ptr + seq)
        rows = tl.arange(0, BLOCK_M)
        tok = first_tok + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
        q_pos = ctx - q_len + tok  # each new token's position in its sequence
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM

        q_offs = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        q = q * scale
        if HAS_ALIBI:
            slope = tl.load(slopes_ptr + head, mask=row_ok, other=0.0).to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Keys past the tile's last query position are masked for every row: stop there.
        kv_end = tl.minimum(ctx, ctx - q_len + tl.minimum(first_tok + BLOCK_Q, q_len))
        n = tl.arange(0, BLOCK_N)
        for start in range(0, kv_end, BLOCK_N):
            k_pos = start + n
            k_ok = k_pos < kv_end
            block = tl.load(tables_ptr + seq * stride_tab + k_pos // PAGE, mask=k_ok, other=0).to(tl.int64)
            slot = k_pos % PAGE
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                        + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                        + d[None, :], mask=kv_mask, other=0.0)
            if F32_DOT:
                scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q.to(k.dtype), tl.trans(k))
            if HAS_ALIBI:
                scores += slope[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            # Rows with nothing visible yet keep m = -inf; shift them by 0 so exp() stays finite.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if F32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_offs = (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# Whether this runs compiled or interpreted is fixed when triton is imported (its own library
# functions are decorated then): TRITON_INTERPRET=1 must be set before that, as the tests do.
# num_seqs is never specialised: as the constant 1 it could not be the binary search's bound.
_kernel: Any = triton.jit(_paged_attention_fn, do_not_specialize=["num_seqs"])


def tile_rows(group: int, num_tokens: int, num_seqs: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_M): tokens per tile and rows per tile (a power of two, at least 16 for
    ``tl.dot``). A pure decode batch gets one token per tile; otherwise about 64 rows."""
    block_q = 1 if num_tokens == num_seqs else max(1, 64 // group)  # T == S: all decodes
    return block_q, max(16, triton.next_power_of_2(block_q * group))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    alibi_slopes: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    block_n: int | None = None) -> torch.Tensor:
    """See ``ReferenceOps.paged_attention``. Returns ``out`` (a new tensor in ``q``'s dtype if not
    given). ``block_n`` sets the keys visited per iteration (default: 64, at least one page)."""
    num_tokens, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged_attention needs q and the caches contiguous in their last dimension")
    group = num_heads // num_kv_heads
    num_seqs = context_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    block_q, block_m = tile_rows(group, num_tokens, num_seqs)
    block_n = block_n or max(64, page)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    slopes = alibi_slopes if alibi_slopes is not None else context_lens  # any pointer; unused
    _kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc, slopes,
        num_seqs, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE=page,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, HAS_ALIBI=alibi_slopes is not None,
        F32_DOT=interpreting() or k_cache.dtype == torch.float32,
    )
    return out
