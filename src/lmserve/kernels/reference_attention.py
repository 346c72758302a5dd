"""Paged attention in pure torch: gather each sequence's blocks, then one SDPA call.

Decodes (one new token) are batched into a single SDPA call over keys padded to the longest
context; prefills and chunked prefills get one call each, so a long prompt never pads the batch.
GQA is expressed by folding each KV head's query heads into the query rows, so keys and values are
never repeated per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    alibi_slopes: torch.Tensor | None) -> torch.Tensor:
    """See ``ReferenceOps.paged_attention``; returns a new ``[T, Hq, D]`` tensor in ``q``'s dtype."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    ctx = [int(c) for c in context_lens.tolist()]
    starts = [int(s) for s in query_start_loc.tolist()]
    for s in range(len(ctx)):
        if ctx[s] < starts[s + 1] - starts[s]:
            raise ValueError(f"context_lens[{s}] = {ctx[s]} is smaller than its {starts[s + 1] - starts[s]} new tokens")
    out = torch.zeros_like(q)
    decodes = [s for s in range(len(ctx)) if starts[s + 1] - starts[s] == 1]
    if decodes:
        _decode_batch(q, k_cache, v_cache, block_tables, ctx, starts, decodes, scale, alibi_slopes, out)
    for s in range(len(ctx)):
        n = starts[s + 1] - starts[s]
        if n > 1:
            _sequence(q, k_cache, v_cache, block_tables[s], ctx[s], starts[s], n, scale, alibi_slopes, out)
    return out


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float32 if q.device.type == "cpu" else q.dtype


def _bias(valid: torch.Tensor, rel: torch.Tensor, slopes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask itself, or an additive float mask carrying ALiBi when there are slopes
    (``slopes`` shaped to broadcast against ``rel`` over KV heads and query-head groups)."""
    if slopes is None:
        return valid
    bias = slopes.to(dtype) * rel.to(dtype)
    return bias.masked_fill(~valid, float("-inf"))


def _decode_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  ctx: list[int], starts: list[int], seqs: list[int], scale: float,
                  alibi_slopes: torch.Tensor | None, out: torch.Tensor) -> None:
    _, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    group = hq // hkv
    dtype = _compute_dtype(q)
    dev = q.device
    lens = torch.tensor([ctx[s] for s in seqs], device=dev)
    nblk = -(-max(ctx[s] for s in seqs) // bs)
    table = block_tables[seqs, :nblk].to(device=dev, dtype=torch.long)
    needed = torch.arange(nblk, device=dev) < ((lens + bs - 1) // bs)[:, None]
    table = torch.where(needed, table, 0)  # padding entries may hold anything; they are masked
    b = len(seqs)
    keys = k_cache[table].reshape(b, nblk * bs, hkv, d).permute(0, 2, 1, 3).to(dtype)
    values = v_cache[table].reshape(b, nblk * bs, hkv, d).permute(0, 2, 1, 3).to(dtype)
    rows = torch.tensor([starts[s] for s in seqs], device=dev)
    queries = q[rows].to(dtype).view(b, hkv, group, d)
    key_pos = torch.arange(nblk * bs, device=dev)
    valid = (key_pos[None, :] < lens[:, None]).view(b, 1, 1, -1)
    rel = (key_pos[None, :] - (lens[:, None] - 1)).view(b, 1, 1, -1)
    slopes = None if alibi_slopes is None else alibi_slopes.to(dev).view(hkv, group, 1)
    mask = _bias(valid, rel, slopes, dtype)
    result = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    out[rows] = result.reshape(b, hq, d).to(out.dtype)


def _sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table_row: torch.Tensor, ctx: int,
              start: int, n: int, scale: float, alibi_slopes: torch.Tensor | None, out: torch.Tensor) -> None:
    _, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    group = hq // hkv
    dtype = _compute_dtype(q)
    dev = q.device
    blocks = table_row[: -(-ctx // bs)].to(device=dev, dtype=torch.long)
    keys = k_cache[blocks].reshape(-1, hkv, d)[:ctx].transpose(0, 1).to(dtype)
    values = v_cache[blocks].reshape(-1, hkv, d)[:ctx].transpose(0, 1).to(dtype)
    # Rows ordered (token, head within group), per KV head.
    queries = q[start:start + n].to(dtype).view(n, hkv, group, d).transpose(0, 1).reshape(hkv, n * group, d)
    query_pos = torch.arange(ctx - n, ctx, device=dev).view(n, 1, 1)
    key_pos = torch.arange(ctx, device=dev).view(1, 1, ctx)
    valid = (key_pos <= query_pos).expand(n, group, ctx)
    rel = (key_pos - query_pos).expand(n, group, ctx)
    slopes = None if alibi_slopes is None else alibi_slopes.to(dev).view(hkv, 1, group, 1)
    mask = _bias(valid, rel, slopes, dtype).reshape(-1, n * group, ctx)
    result = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    out[start:start + n] = result.view(hkv, n, group, d).transpose(0, 1).reshape(n, hq, d).to(out.dtype)
