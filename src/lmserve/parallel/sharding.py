"""The one place that says which slice of a full checkpoint tensor each tensor-parallel rank holds.

Megatron layout: column-parallel weights (q/k/v, gate/up) split their output features, row-parallel
weights (o_proj, down_proj) their input features, embeddings and LM heads their (padded) vocabulary.
Attention heads are split whole. The live loader and the offline converter both call ``shard`` so a
pre-sharded cache always matches what live loading would produce.

Query heads go to ranks in contiguous runs whose sizes differ by at most one, so a degree need not
divide the head count (9 heads over 2 ranks: 5 and 4). Each rank then holds the KV heads its query
heads read. When its query heads use their KV heads unevenly (5 heads = 3 on KV head 0 and 2 on KV
head 1), a KV head is repeated so that every local KV head serves the same number of local query
heads, which is the grouped-query layout attention kernels expect. With even splits this is the
familiar layout: KV heads split across ranks, or replicated when there are fewer than ranks.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from itertools import groupby

import torch


class Split(enum.Enum):
    REPLICATE = "replicate"  # every rank holds the whole tensor (norms, biases of row layers)
    COLUMN = "column"  # split dim 0 (output features) evenly
    ROW = "row"  # split dim 1 (input features) evenly
    VOCAB = "vocab"  # split dim 0 after padding rows to a multiple of the degree
    HEADS = "heads"  # dim 0 holds heads of ``head_dim`` rows: this rank's query heads
    KV_HEADS = "kv_heads"  # dim 0 holds KV heads: the ones this rank's query heads read


@dataclass(frozen=True)
class HeadLayout:
    """How many heads of ``head_dim`` rows a head-split tensor holds.

    ``num_kv_heads`` is needed for ``Split.KV_HEADS`` only: ``num_heads`` query heads share it in
    groups of ``num_heads // num_kv_heads`` (grouped-query attention).
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None


def pad_vocab(vocab_size: int, world_size: int, multiple: int = 64) -> int:
    """Vocabulary rows after padding so every rank gets an equal, aligned share."""
    step = world_size * multiple
    return -(-vocab_size // step) * step


def heads_per_rank(num_heads: int, world_size: int) -> int:
    """Heads each rank holds under an even split: an even share, or 1 (replicated) when heads are
    fewer than ranks. Raises when neither works (see ``query_heads`` for the uneven split)."""
    if num_heads >= world_size:
        if num_heads % world_size:
            raise ValueError(f"{num_heads} heads cannot be split evenly over {world_size} ranks")
        return num_heads // world_size
    if world_size % num_heads:
        raise ValueError(f"{num_heads} heads cannot be replicated evenly over {world_size} ranks")
    return 1


def query_heads(num_heads: int, world_size: int, rank: int) -> range:
    """The query heads ``rank`` holds: a contiguous run; earlier ranks take one extra when uneven."""
    if num_heads < world_size:
        raise ValueError(f"{num_heads} query heads cannot be split over {world_size} ranks "
                         f"(every rank needs at least one)")
    base, extra = divmod(num_heads, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def kv_heads(num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> list[int]:
    """The KV heads ``rank`` holds, in order; local query head ``i`` reads local KV head
    ``i // (len(query_heads) // len(kv_heads))``. A KV head appears more than once when the rank's
    query heads use their KV heads unevenly."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads evenly")
    group = num_heads // num_kv_heads
    owners = [head // group for head in query_heads(num_heads, world_size, rank)]
    runs = [len(list(run)) for _, run in groupby(owners)]
    step = math.gcd(*runs)
    return owners[::step]


def shard(tensor: torch.Tensor, split: Split, rank: int, world_size: int,
          heads: HeadLayout | None = None) -> torch.Tensor:
    """This rank's slice of a full checkpoint tensor."""
    if world_size == 1 or split is Split.REPLICATE:
        return tensor
    if split is Split.COLUMN:
        return _even_chunk(tensor, 0, rank, world_size)
    if split is Split.ROW:
        return _even_chunk(tensor, 1, rank, world_size)
    if split is Split.VOCAB:
        rows = pad_vocab(tensor.shape[0], world_size)
        if rows != tensor.shape[0]:
            pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        return _even_chunk(tensor, 0, rank, world_size)
    if split is Split.HEADS:
        assert heads is not None, "a HEADS split needs the head layout"
        if heads.num_heads < world_size:  # fewer heads than ranks: each rank keeps the one it reads
            first = rank * heads.num_heads // world_size
            return tensor.narrow(0, first * heads.head_dim, heads.head_dim).contiguous()
        run = query_heads(heads.num_heads, world_size, rank)
        return tensor.narrow(0, run.start * heads.head_dim, len(run) * heads.head_dim).contiguous()
    if split is Split.KV_HEADS:
        assert heads is not None and heads.num_kv_heads is not None, "a KV_HEADS split needs the GQA layout"
        wanted = kv_heads(heads.num_heads, heads.num_kv_heads, world_size, rank)
        by_head = tensor.reshape(heads.num_kv_heads, heads.head_dim, *tensor.shape[1:])
        picked = by_head.index_select(0, torch.tensor(wanted, dtype=torch.long))
        return picked.reshape(len(wanted) * heads.head_dim, *tensor.shape[1:]).contiguous()
    raise ValueError(f"unknown split {split}")


def _even_chunk(tensor: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    size = tensor.shape[dim]
    if size % world_size:
        raise ValueError(f"dimension {dim} of size {size} cannot be split evenly over {world_size} ranks")
    step = size // world_size
    return tensor.narrow(dim, rank * step, step).contiguous()
