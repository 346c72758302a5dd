"""Applying token bitmasks to logits: one batched tensor operation for every constrained row."""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(32, dtype=torch.int32)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 bitmask of ``rows`` x ceil(vocab/32) words; bit ``t % 32`` of word ``t // 32`` set
    means token ``t`` is allowed (llguidance's layout)."""
    return torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set ``logits[rows[i], t] = -inf`` wherever bit ``t`` of ``bitmask[i]`` is clear, in place.

    The logits may be wider than the bitmask covers (a padded vocabulary): those tokens are
    disallowed too.
    """
    n, vocab = len(rows), logits.shape[-1]
    bits = (bitmask[:n].unsqueeze(-1) >> _SHIFTS) & 1  # [n, words, 32]
    allowed = bits.view(n, -1).to(torch.bool).to(logits.device)
    disallowed = torch.ones(n, vocab, dtype=torch.bool, device=logits.device)
    width = min(vocab, allowed.shape[1])
    disallowed[:, :width] = ~allowed[:, :width]
    if n == logits.shape[0] and rows == list(range(n)):
        logits.masked_fill_(disallowed, float("-inf"))
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(disallowed, float("-inf")))


__all__ = ["allocate_bitmask", "apply_bitmask"]
