"""Bidirectional attention within each text of a packed batch (encoder models) against a float64
oracle: texts of every length (none, one token, longer than a 16-key chunk), head sizes, strided
rows, thread counts, and the errors for what it does not take."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels import Ops


@pytest.fixture
def kernel(compiled_ops: Ops) -> object:
    ext = getattr(compiled_ops, "ext", None)
    if ext is None or not hasattr(ext, "encoder_attention"):
        pytest.skip("the AVX-512 build of the CPU kernels is not in use here")
    return ext


def oracle(qkv: torch.Tensor, lengths: list[int], heads: int, scale: float) -> torch.Tensor:
    """Each text's softmax(q k^T * scale) v in float64, every head, no masking within a text."""
    dim = qkv.shape[1] // 3 // heads
    out, at = [], 0
    for n in lengths:
        q, k, v = qkv[at:at + n].double().view(n, 3, heads, dim).permute(1, 2, 0, 3)
        out.append((torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v).permute(1, 0, 2).reshape(n, heads * dim))
        at += n
    return torch.cat(out).float()


def starts(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths]).cumsum(0)


@pytest.mark.parametrize(("heads", "dim", "lengths"), [
    (12, 32, [14, 9, 20, 1, 17]),     # a dynamic batch of short sentences (all-MiniLM-L6-v2's heads)
    (12, 64, [5, 300, 3]),            # one long text among short ones (BERT-base heads)
    (2, 16, [0, 1, 2, 33]),           # an empty text, one token, a text past two 16-key chunks
    (16, 128, [40]),                  # one text alone
], ids=["minilm", "base-long", "edges", "alone"])  # fmt: skip
def test_matches_the_float64_oracle(kernel: object, threads: int, heads: int, dim: int, lengths: list[int]) -> None:
    qkv = torch.randn(sum(lengths), 3 * heads * dim) * 2
    got = kernel.encoder_attention(qkv, starts(lengths), heads, dim**-0.5, threads)  # type: ignore[attr-defined]
    assert got.shape == (sum(lengths), heads * dim)
    torch.testing.assert_close(got, oracle(qkv, lengths, heads, dim**-0.5), rtol=1e-4, atol=2e-5)


def test_reads_rows_of_a_wider_matrix_in_place(kernel: object) -> None:
    lengths, heads, dim = [7, 12], 4, 32
    wide = torch.randn(sum(lengths), 3 * heads * dim + 40)
    qkv = wide[:, 8:8 + 3 * heads * dim]  # rows strided past their width
    got = kernel.encoder_attention(qkv, starts(lengths), heads, 0.3, 2)  # type: ignore[attr-defined]
    torch.testing.assert_close(got, oracle(qkv.contiguous(), lengths, heads, 0.3), rtol=1e-4, atol=2e-5)


def test_refuses_what_it_does_not_take(kernel: object) -> None:
    ext = kernel
    qkv = torch.randn(10, 3 * 2 * 32)
    with pytest.raises(ValueError, match="starts must be non-decreasing"):
        ext.encoder_attention(qkv, torch.tensor([0, 6, 4]), 2, 1.0, 1)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="starts must be non-decreasing"):
        ext.encoder_attention(qkv, torch.tensor([0, 11]), 2, 1.0, 1)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="head_dim 24"):
        ext.encoder_attention(torch.randn(4, 3 * 2 * 24), torch.tensor([0, 4]), 2, 1.0, 1)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="is not 3 x 5 heads"):
        ext.encoder_attention(qkv, torch.tensor([0, 10]), 5, 1.0, 1)  # type: ignore[attr-defined]
    assert not ext.encoder_attention_supports_head_dim(24) and ext.encoder_attention_supports_head_dim(64)  # type: ignore[attr-defined]
