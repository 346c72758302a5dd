"""Which slice of each checkpoint tensor a rank holds, including uneven head splits."""

from __future__ import annotations

import pytest
import torch

from lmserve.parallel.layers import QKVParallelLinear, RowParallelLinear
from lmserve.parallel.sharding import HeadLayout, Split, kv_heads, query_heads, shard
from lmserve.parallel.state import ParallelState


def test_query_heads_split_contiguously_with_the_extra_heads_first() -> None:
    assert [list(query_heads(9, 2, r)) for r in range(2)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert [list(query_heads(9, 3, r)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="4 query heads cannot be split over 8 ranks"):
        query_heads(4, 8, 0)


@pytest.mark.parametrize(("heads", "kv", "world", "expected"), [
    (9, 3, 3, [[0], [1], [2]]),  # one KV head per rank
    (4, 1, 2, [[0], [0]]),  # fewer KV heads than ranks: replicated
    (8, 2, 4, [[0], [0], [1], [1]]),
    (8, 4, 2, [[0, 1], [2, 3]]),  # an even split of KV heads
    (9, 3, 2, [[0, 0, 0, 1, 1], [1, 2, 2, 2]]),  # uneven: 3+2 and 1+3 query heads per KV head
    (12, 3, 2, [[0, 0, 1], [1, 2, 2]]),  # runs of 4+2 and 2+4 query heads: one KV head per 2
    (6, 6, 4, [[0, 1], [2, 3], [4], [5]]),  # multi-head attention split unevenly
])
def test_kv_heads_give_every_local_kv_head_the_same_number_of_query_heads(
        heads: int, kv: int, world: int, expected: list[list[int]]) -> None:
    group = heads // kv
    got = [kv_heads(heads, kv, world, r) for r in range(world)]
    assert got == expected
    for rank, local_kv in enumerate(got):
        local_q = list(query_heads(heads, world, rank))
        per_kv = len(local_q) // len(local_kv)
        assert per_kv * len(local_kv) == len(local_q)
        # local query head i reads local KV head i // per_kv, which must be the KV head it reads globally
        assert [local_kv[i // per_kv] for i in range(len(local_q))] == [h // group for h in local_q]


def test_shard_kv_heads_picks_and_repeats_rows() -> None:
    full = torch.arange(3 * 2).view(3 * 2, 1)  # 3 KV heads of head_dim 2
    layout = HeadLayout(9, 2, 3)
    assert shard(full, Split.KV_HEADS, 1, 2, layout).flatten().tolist() == [2, 3, 4, 5, 4, 5, 4, 5]


def test_heads_without_enough_heads_for_every_rank_are_replicated_as_before() -> None:
    full = torch.arange(4).view(4, 1)  # 2 heads of head_dim 2 over 4 ranks
    assert [shard(full, Split.HEADS, r, 4, HeadLayout(2, 2)).flatten().tolist() for r in range(4)] == \
        [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_fused_per_head_and_block_qkv_unfuse_to_the_same_layer() -> None:
    heads, d, hidden, world = 4, 2, 6, 2
    q, k, v = (torch.randn(heads * d, hidden) for _ in range(3))
    blocks = torch.cat([q, k, v])
    per_head = torch.stack([q.view(heads, d, hidden), k.view(heads, d, hidden), v.view(heads, d, hidden)],
                           dim=1).reshape(3 * heads * d, hidden)
    for rank in range(world):
        state = ParallelState(rank, world)
        apart, fused_blocks, fused_heads = (QKVParallelLinear(hidden, d, heads, heads, state=state, fused=f)
                                            for f in (None, "qkv", "per_head"))
        for part, t in zip("qkv", (q, k, v), strict=True):
            apart.weight.weight_loader(apart.weight, t, part)
        fused_blocks.weight.weight_loader(fused_blocks.weight, blocks, None)
        fused_heads.weight.weight_loader(fused_heads.weight, per_head, None)
        assert torch.equal(apart.weight, fused_blocks.weight)
        assert torch.equal(apart.weight, fused_heads.weight)


def test_uneven_row_split_matches_the_query_heads() -> None:
    o_proj = torch.randn(8, 9 * 4)  # hidden 8, 9 heads of head_dim 4
    parts = []
    for rank in range(2):
        layer = RowParallelLinear(36, 8, state=ParallelState(rank, 2), in_split=HeadLayout(9, 4))
        layer.weight.weight_loader(layer.weight, o_proj, None)
        parts.append(layer.weight.data)
    assert [p.shape[1] for p in parts] == [20, 16]
    assert torch.equal(torch.cat(parts, dim=1), o_proj)
