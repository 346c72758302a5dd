"""Applying token bitmasks to logits: one batched unpacking of every constrained row's bitmask, then
an in-place fill (one operation when every row of the step is constrained)."""

from __future__ import annotations

import torch

# For each byte value, which of its 8 bits are clear: one table lookup per byte of the bitmask is
# several times faster on a CPU than shifting every 32-bit word 32 times.
_CLEAR_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1) == 0  # [256, 8] bool


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
    # Little-endian words: bit j of byte k is token 8k + j.
    as_bytes = bitmask[:n].contiguous().view(torch.uint8).to(torch.long)
    clear = _CLEAR_BITS.index_select(0, as_bytes.view(-1)).view(n, -1)  # [n, words * 32]
    if clear.shape[1] >= vocab:
        disallowed = clear[:, :vocab]
    else:  # the logits are wider than the tokenizer: the extra ids are never allowed
        disallowed = torch.ones(n, vocab, dtype=torch.bool)
        disallowed[:, :clear.shape[1]] = clear
    disallowed = disallowed.to(logits.device)
    if n == logits.shape[0] and rows == list(range(n)):
        logits.masked_fill_(disallowed, float("-inf"))
        return
    for k, row in enumerate(rows):  # in place, row by row: half the memory traffic of gather + scatter
        logits[row].masked_fill_(disallowed[k], float("-inf"))


__all__ = ["allocate_bitmask", "apply_bitmask"]
