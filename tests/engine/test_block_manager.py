"""The KV block manager, without a model."""

from __future__ import annotations

import pytest

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.request import Request
from lmserve.engine.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def compute_all(bm: BlockManager, req: Request) -> None:
    """Pretend the model computed everything the request was given blocks for."""
    req.num_computed_tokens = req.num_tokens
    bm.cache_computed_blocks(req)


def test_allocation_rounds_up_to_whole_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=10, block_size=4)
    req = make_request("a", list(range(9)))
    assert bm.allocate(req, 9)
    assert len(req.block_ids) == 3 and len(set(req.block_ids)) == 3
    assert bm.num_free_blocks == 7
    bm.free(req)
    assert bm.num_free_blocks == 10 and req.block_ids == []


def test_growing_by_one_token_allocates_only_at_block_boundaries():
    bm = BlockManager(num_blocks=10, block_size=4)
    req = make_request("a", [1, 2, 3])
    assert bm.allocate(req, 3)
    req.num_computed_tokens = 3
    req.output_token_ids.append(7)  # 4 tokens: still one block
    assert bm.allocate(req, 1) and len(req.block_ids) == 1
    req.num_computed_tokens = 4
    req.output_token_ids.append(8)  # 5th token needs a second block
    assert bm.allocate(req, 1) and len(req.block_ids) == 2


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    req = make_request("a", list(range(12)))
    assert not bm.allocate(req, 12)
    assert req.block_ids == [] and bm.num_free_blocks == 2


def test_full_block_prefix_is_shared_and_ref_counted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(10)))
    assert bm.allocate(a, 10)
    compute_all(bm, a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    prefix = bm.find_cached_prefix(b)
    assert prefix == a.block_ids[:2]  # two full blocks match; the third differs
    assert bm.allocate(b, b.num_tokens - 8, prefix)
    assert b.num_computed_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert bm.blocks[a.block_ids[0]].ref_count == 2
    assert bm.prefix_hit_tokens == 8
    bm.free(a)
    assert bm.blocks[b.block_ids[0]].ref_count == 1  # still held by b
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_freed_prefix_stays_a_hit_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(8)) + [50])
    assert bm.allocate(a, 9)
    compute_all(bm, a)
    bm.free(a)
    again = make_request("a2", list(range(8)) + [60])
    assert len(bm.find_cached_prefix(again)) == 2
    # Fill the cache with unrelated tokens: uncached free blocks go first, then cached ones are evicted.
    filler = make_request("f", list(range(100, 116)))
    assert bm.allocate(filler, 16)
    assert bm.find_cached_prefix(again) == []


def test_a_whole_prompt_hit_still_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(8)))
    assert bm.allocate(a, 8)
    compute_all(bm, a)
    b = make_request("b", list(range(8)))
    prefix = bm.find_cached_prefix(b)
    assert len(prefix) == 1  # the last block is recomputed so the step yields logits
    assert bm.allocate(b, 4, prefix) and b.num_computed_tokens == 4


def test_hash_chain_distinguishes_same_block_at_different_depth():
    bm = BlockManager(num_blocks=10, block_size=2)
    a = make_request("a", [1, 2, 1, 2, 9])
    assert bm.allocate(a, 5)
    compute_all(bm, a)
    b = make_request("b", [3, 4, 1, 2, 9])  # second block equals a's first block, different parent
    assert bm.find_cached_prefix(b) == []


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    assert bm.allocate(a, 9)
    compute_all(bm, a)
    assert bm.find_cached_prefix(make_request("b", list(range(9)))) == []


def test_partially_computed_blocks_are_not_published():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(12)))
    assert bm.allocate(a, 6)  # chunked prefill: 6 of 12 tokens this step
    a.num_computed_tokens = 6
    bm.cache_computed_blocks(a)
    b = make_request("b", list(range(12)))
    assert len(bm.find_cached_prefix(b)) == 1


@pytest.mark.parametrize("bad", [(0, 4), (4, 0)])
def test_rejects_empty_geometry(bad):
    with pytest.raises(ValueError):
        BlockManager(*bad)


def test_mapped_memory_is_handed_out_before_a_cached_prefix_is_evicted_and_unmapped_memory_last():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.mapped = 4  # blocks 0-3 mapped, 4-7 never written (the CPU maps memory on first write)
    a = make_request("a", list(range(8)))
    assert bm.allocate(a, 8)
    compute_all(bm, a)
    assert a.block_ids == [0, 1] and bm.high_water == 2
    bm.free(a)  # blocks 0 and 1 keep a's prefix
    b = make_request("b", list(range(100, 108)))
    assert bm.allocate(b, 8)
    assert b.block_ids == [2, 3]  # never-used but mapped: nothing evicted
    c = make_request("c", list(range(200, 208)))
    assert bm.allocate(c, 8)
    assert sorted(c.block_ids) == [0, 1]  # a's prefix, least recently freed, rather than unmapped 4-5
    assert bm.find_cached_prefix(make_request("a2", list(range(8)) + [9])) == []
    d = make_request("d", list(range(300, 308)))
    assert bm.allocate(d, 8)
    assert d.block_ids == [4, 5] and bm.high_water == 6  # nothing used is free: unmapped memory
    assert bm.num_free_blocks == 2


def test_when_every_block_is_mapped_never_used_blocks_go_before_any_cached_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)  # mapped from the start (the default; a GPU cache)
    a = make_request("a", list(range(8)))
    assert bm.allocate(a, 8)
    compute_all(bm, a)
    bm.free(a)
    b = make_request("b", list(range(100, 124)))
    assert bm.allocate(b, 24)
    assert b.block_ids == [2, 3, 4, 5, 6, 7]
    assert bm.find_cached_prefix(make_request("a2", list(range(8)) + [9])) == [0, 1]
