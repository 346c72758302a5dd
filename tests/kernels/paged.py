"""Random paged KV caches and an independent float64 attention oracle for the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, self.query_start_loc)


def make_batch(new_tokens: list[int], context: list[int], num_heads: int = 9, num_kv_heads: int = 3,
               head_dim: int = 64, block_size: int = 16, dtype: torch.dtype = torch.bfloat16,
               seed: int = 0) -> PagedBatch:
    """Sequences with ``new_tokens[s]`` queries over ``context[s]`` cached tokens, their blocks
    shuffled over a cache with spare blocks, and out-of-range ids in unused table slots."""
    g = torch.Generator().manual_seed(seed)
    needs = [-(-c // block_size) for c in context]
    num_blocks = sum(needs) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(context), max(needs) + 2), num_blocks + 7, dtype=torch.int32)
    used = 0
    for s, need in enumerate(needs):
        tables[s, :need] = order[used:used + need].to(torch.int32)
        used += need
    starts = torch.zeros(len(new_tokens) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(new_tokens).cumsum(0)
    q = torch.randn(int(starts[-1]), num_heads, head_dim, generator=g)
    return PagedBatch(q, k_cache, v_cache, tables, torch.tensor(context, dtype=torch.int32), starts)


def naive_attention(b: PagedBatch, scale: float, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token, reading the cache one position at a time, in float64."""
    num_heads, num_kv_heads, bs = b.q.shape[1], b.k_cache.shape[2], b.k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros(b.q.shape, dtype=torch.float64)
    for s, ctx in enumerate(b.context_lens.tolist()):
        q0, q1 = int(b.query_start_loc[s]), int(b.query_start_loc[s + 1])
        pos = torch.arange(ctx)
        blocks = b.block_tables[s, pos // bs].long()
        keys = b.k_cache[blocks, pos % bs].double().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        values = b.v_cache[blocks, pos % bs].double().repeat_interleave(group, dim=1)
        for i in range(q1 - q0):
            p = ctx - (q1 - q0) + i
            scores = torch.einsum("khd,hd->hk", keys[:p + 1], b.q[q0 + i].double()) * scale
            if alibi_slopes is not None:
                scores = scores + alibi_slopes.double()[:, None] * (torch.arange(p + 1) - p).double()
            out[q0 + i] = torch.einsum("hk,khd->hd", scores.softmax(-1), values[:p + 1])
    return out.float()
