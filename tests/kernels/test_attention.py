"""Paged attention (decode, prefill, chunked prefill, mixed) against a float64 oracle."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lmserve.kernels import Ops

from .paged import PagedBatch, make_batch, naive_attention


def check(ops: Ops, b: PagedBatch, alibi: torch.Tensor | None = None) -> None:
    scale = b.q.shape[-1] ** -0.5
    got = ops.paged_attention(*b.args(), scale, alibi)
    torch.testing.assert_close(got, naive_attention(b, scale, alibi), rtol=1e-4, atol=2e-5)


# (new tokens, context) per sequence: decode at and around block edges, prefill, prefill over a
# cached prefix, and all of them in one call.
BATCHES = {
    "decode": ([1, 1, 1, 1, 1], [1, 15, 16, 17, 100]),
    "prefill": ([37], [37]),
    "long-prefill": ([150], [150]),
    "chunked-prefill": ([20, 64], [150, 64 + 33]),
    "mixed": ([1, 33, 1, 7, 1, 2], [50, 33, 300, 40, 2, 2]),
}


@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_batches(ops: Ops, batch: str, dtype: torch.dtype) -> None:
    new, ctx = BATCHES[batch]
    check(ops, make_batch(new, ctx, dtype=dtype))


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (8, 2), (16, 1), (64, 1)],
                         ids=["mha", "gqa3", "gqa4", "gqa16", "mqa64"])
def test_gqa_ratios(ops: Ops, heads: int, kv_heads: int) -> None:
    check(ops, make_batch([1, 19, 1], [40, 60, 7], num_heads=heads, num_kv_heads=kv_heads))


@pytest.mark.parametrize("block_size", [1, 4, 32, 128])
def test_block_sizes(ops: Ops, block_size: int) -> None:
    check(ops, make_batch([1, 45, 3], [77, 45, 140], block_size=block_size))


@pytest.mark.parametrize("head_dim", [32, 40, 80, 128, 256])
def test_head_dims(ops: Ops, head_dim: int) -> None:
    # 40 has no compiled kernel: the compiled ops hand it to the fallback.
    check(ops, make_batch([1, 20], [33, 50], num_heads=4, num_kv_heads=2, head_dim=head_dim))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decodes_of_wide_query_groups_split_along_their_keys(ops: Ops, dtype: torch.dtype) -> None:
    # 64 query heads on one KV head make row-lane tiles of a single token (48 and 16 rows); with few
    # of them per thread, long contexts are split along their keys and the parts merged afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(ops, make_batch([1, 1], [1100, 700], num_heads=64, num_kv_heads=1, dtype=dtype))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_alibi(ops: Ops, dtype: torch.dtype) -> None:
    b = make_batch([1, 30, 5], [90, 30, 64], num_heads=8, num_kv_heads=2, dtype=dtype)
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(8)])
    check(ops, b, slopes)


def test_many_decodes_and_thread_counts(ops: Ops, threads: int) -> None:
    # Enough decodes for one work item per sequence, and few long ones whose keys get split.
    check(ops, make_batch([1] * 24, [int(c) for c in torch.randint(1, 200, (24,)).tolist()], seed=threads))
    check(ops, make_batch([1, 1], [1500, 700], seed=threads))
    check(ops, make_batch([1], [2000], num_heads=4, num_kv_heads=4, seed=threads))


def test_strided_q_and_out(ops: Ops) -> None:
    b = make_batch([1, 12], [20, 12], num_heads=4, num_kv_heads=2)
    scale = 0.125
    want = naive_attention(b, scale)
    fused = torch.randn(13, 4 * 64 + 2 * 2 * 64)  # q|k|v rows as a fused projection returns them
    fused[:, :256] = b.q.reshape(13, 256)
    q = fused[:, :256].view(13, 4, 64)
    got = ops.paged_attention(q, *b.args()[1:], scale)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    out = torch.full((13, 4, 64), float("nan"))
    assert ops.paged_attention(q, *b.args()[1:], scale, out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-4, atol=2e-5)
    wide_out = torch.zeros(13, 4, 80)[:, :, :64]  # rows not contiguous
    ops.paged_attention(q, *b.args()[1:], scale, out=wide_out)
    torch.testing.assert_close(wide_out, want, rtol=1e-4, atol=2e-5)


def test_metadata_dtypes(ops: Ops) -> None:
    b = make_batch([3, 1], [10, 20])
    want = naive_attention(b, 0.1)
    got = ops.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables.long(), b.context_lens.long(),
                              b.query_start_loc.long(), 0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_context_shorter_than_new_tokens_is_refused(ops: Ops) -> None:
    b = make_batch([5], [5])
    b.context_lens[0] = 4
    with pytest.raises(ValueError, match="smaller than"):
        ops.paged_attention(*b.args(), 0.1)


def test_bad_block_ids_are_refused(compiled_ops: Ops) -> None:
    b = make_batch([1], [40])
    b.block_tables[0, 1] = b.k_cache.shape[0]
    with pytest.raises(ValueError, match="not a block"):
        compiled_ops.paged_attention(*b.args(), 0.1)
    b.block_tables[0, 1] = 0
    b.context_lens[0] = 16 * b.block_tables.shape[1] + 1
    b.q = b.q[:1]
    with pytest.raises(ValueError, match="columns"):
        compiled_ops.paged_attention(*b.args(), 0.1)


def test_sequences_without_new_tokens_and_empty_batches(ops: Ops) -> None:
    b = make_batch([2, 0, 1], [9, 30, 5])
    check(ops, b)
    empty = make_batch([0], [4])
    assert ops.paged_attention(*empty.args(), 0.1).shape == (0, 9, 64)


@pytest.mark.parametrize(("heads", "kv_heads", "dtype"), [(4, 4, torch.float32), (8, 2, torch.bfloat16)])
def test_many_decodes_with_alibi(ops: Ops, heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    # 40 decodes: each sequence is one work item over all its KV heads.
    ctx = [int(c) for c in torch.randint(1, 120, (40,), generator=torch.Generator().manual_seed(5)).tolist()]
    b = make_batch([1] * 40, ctx, num_heads=heads, num_kv_heads=kv_heads, dtype=dtype, block_size=8)
    check(ops, b, torch.linspace(0.05, 0.8, heads))


@pytest.fixture
def dot_ops(compiled_ops: Ops) -> Iterator[Ops]:
    """The compiled ops with prefill tiles on the bf16 dot-product loop, where this CPU runs it."""
    from lmserve.kernels.attention_choice import dot_available

    why = dot_available(compiled_ops)
    if why is not None:
        pytest.skip(f"no bf16 dot-product attention here: {why}")
    compiled_ops.attention_dot = True  # type: ignore[attr-defined]
    yield compiled_ops
    compiled_ops.attention_dot = False  # type: ignore[attr-defined]


def check_bf16(ops: Ops, b: PagedBatch, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Within what rounding q and the softmax weights to bf16 costs (values here are up to ~3)."""
    scale = b.q.shape[-1] ** -0.5
    got = ops.paged_attention(*b.args(), scale, alibi)
    torch.testing.assert_close(got, naive_attention(b, scale, alibi), rtol=1e-2, atol=2e-2)
    return got


@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_dot_loop_batches(dot_ops: Ops, batch: str) -> None:
    new, ctx = BATCHES[batch]
    check_bf16(dot_ops, make_batch(new, ctx))


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 4, 80), (16, 1, 32),
                                                              (64, 1, 64), (4, 2, 256)])
def test_dot_loop_layouts_and_block_sizes(dot_ops: Ops, heads: int, kv_heads: int, head_dim: int) -> None:
    for block_size in (1, 16, 128):  # odd key counts, chunk ends inside blocks, padded pairs
        check_bf16(dot_ops, make_batch([45, 3, 19], [45, 140, 77], num_heads=heads, num_kv_heads=kv_heads,
                                        head_dim=head_dim, block_size=block_size))


def test_dot_loop_alibi_and_threads(dot_ops: Ops, threads: int) -> None:
    b = make_batch([30, 17], [30, 64], num_heads=8, num_kv_heads=2, seed=threads)
    check_bf16(dot_ops, b, torch.tensor([2.0 ** (-(i + 1)) for i in range(8)]))


def test_dot_loop_decodes_of_wide_query_groups_split_along_their_keys(dot_ops: Ops) -> None:
    # 64 query heads on one KV head make row-lane tiles of a single token (48 and 16 rows); with few
    # of them per thread, long contexts are split along their keys and the parts merged afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_bf16(dot_ops, make_batch([1, 1], [1100, 700], num_heads=64, num_kv_heads=1))
    finally:
        torch.set_num_threads(before)


def test_dot_loop_runs_only_for_a_bf16_cache_and_rounds_differently(dot_ops: Ops) -> None:
    b = make_batch([40], [40])
    dot = check_bf16(dot_ops, b)
    dot_ops.attention_dot = False  # type: ignore[attr-defined]
    assert not torch.equal(dot, dot_ops.paged_attention(*b.args(), 64 ** -0.5))  # the dot loop did run
    dot_ops.attention_dot = True  # type: ignore[attr-defined]
    check(dot_ops, make_batch([40], [40], dtype=torch.float32))  # an fp32 cache keeps the fp32 loop exactly
