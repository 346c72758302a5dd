"""The one place that says which slice of a full checkpoint tensor each tensor-parallel rank holds.

Megatron layout: column-parallel weights (q/k/v, gate/up) split their output features, row-parallel
weights (o_proj, down_proj) their input features, embeddings and LM heads their (padded) vocabulary.
Attention heads are split whole; when KV heads do not divide the degree they are replicated, each
rank keeping the KV head its query heads use. The live loader and the offline converter both call
``shard`` so a pre-sharded cache always matches what live loading would produce.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Split(enum.Enum):
    REPLICATE = "replicate"  # every rank holds the whole tensor (norms, biases of row layers)
    COLUMN = "column"  # split dim 0 (output features) evenly
    ROW = "row"  # split dim 1 (input features) evenly
    VOCAB = "vocab"  # split dim 0 after padding rows to a multiple of the degree
    HEADS = "heads"  # split dim 0 by attention heads of ``head_dim`` rows, replicating if needed


@dataclass(frozen=True)
class HeadLayout:
    """How many heads of ``head_dim`` rows a HEADS-split tensor holds."""

    num_heads: int
    head_dim: int


def pad_vocab(vocab_size: int, world_size: int, multiple: int = 64) -> int:
    """Vocabulary rows after padding so every rank gets an equal, aligned share."""
    step = world_size * multiple
    return -(-vocab_size // step) * step


def heads_per_rank(num_heads: int, world_size: int) -> int:
    """Heads each rank holds: an even split, or 1 (replicated) when heads are fewer than ranks."""
    if num_heads >= world_size:
        if num_heads % world_size:
            raise ValueError(f"{num_heads} heads cannot be split evenly over {world_size} ranks")
        return num_heads // world_size
    if world_size % num_heads:
        raise ValueError(f"{num_heads} heads cannot be replicated evenly over {world_size} ranks")
    return 1


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
        per_rank = heads_per_rank(heads.num_heads, world_size)
        first = rank * heads.num_heads // world_size if per_rank == 1 else rank * per_rank
        return tensor.narrow(0, first * heads.head_dim, per_rank * heads.head_dim).contiguous()
    raise ValueError(f"unknown split {split}")


def _even_chunk(tensor: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    size = tensor.shape[dim]
    if size % world_size:
        raise ValueError(f"dimension {dim} of size {size} cannot be split evenly over {world_size} ranks")
    step = size // world_size
    return tensor.narrow(dim, rank * step, step).contiguous()
