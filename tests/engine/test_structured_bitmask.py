"""The bitmask-to-logits step, against a bit-by-bit reading of llguidance's layout."""

from __future__ import annotations

import pytest
import torch

from lmserve.engine.structured.bitmask import apply_bitmask


def _allowed(bitmask_row: torch.Tensor, token: int) -> bool:
    words = bitmask_row.shape[0]
    return token < 32 * words and bool((int(bitmask_row[token // 32]) >> (token % 32)) & 1)


@pytest.mark.parametrize(("batch", "rows", "vocab"), [(5, [0, 1, 2, 3, 4], 100), (7, [0, 2, 3, 6], 100),
                                                      (3, [1], 130)])  # 130: logits wider than the mask
def test_exactly_the_clear_bits_become_minus_infinity(batch: int, rows: list[int], vocab: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), 4), dtype=torch.int32, generator=gen)  # 128 tokens
    logits = torch.randn(batch, vocab, generator=gen)
    before = logits.clone()
    apply_bitmask(logits, bitmask, rows)
    for r in range(batch):
        for t in range(vocab):
            if r in rows and not _allowed(bitmask[rows.index(r)], t):
                assert logits[r, t] == float("-inf"), (r, t)
            else:
                assert logits[r, t] == before[r, t], (r, t)
