"""Tensor-parallel building blocks: each layer holds its rank's slice and does its own communication.

Every parameter carries a ``weight_loader(param, full_tensor, part)`` that cuts the rank's slice out
of a full checkpoint tensor with ``sharding.shard`` and places it (for merged layers, at the offset of
``part``). After loading, ``finalize`` packs each linear layer's weight for the device's kernels
(``Ops``); the packed form is what the layer multiplies by from then on (``LinearBase.packed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels import KernelModule, Module, Ops, PackedLinear
from lmserve.kernels.packed import HugePageArena
from lmserve.parallel.sharding import HeadLayout, Split, kv_heads, pad_vocab, query_heads, shard
from lmserve.parallel.state import SINGLE, ParallelState

FUSED_LAYOUTS = ("qkv", "per_head")
L = TypeVar("L", bound="LinearBase")


def _param(shape: Sequence[int], dtype: torch.dtype, loader: Any) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


class LinearBase(KernelModule):
    """y = x W^T (+ b) on this rank's slice; ``finalize`` swaps the weight for its packed form."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 state: ParallelState) -> None:
        super().__init__()
        self.state = state
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features), dtype, self.load_weight)
        self.bias = _param((out_features,), dtype, self.load_bias) if bias else None
        self._packed: PackedLinear | None = None
        # Kernel choice (kernels/choice.py): (min_rows, form) steps, ascending; empty means _packed.
        self._routes: tuple[tuple[int, PackedLinear], ...] = ()

    def load_weight(self, param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        raise NotImplementedError

    def load_bias(self, param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        raise NotImplementedError

    @property
    def packed(self) -> PackedLinear | None:
        """The weight as the kernels multiply by it, once ``finalize`` or ``restore_packed`` ran."""
        return self._packed

    def pack(self, ops: Ops) -> PackedLinear:
        """This layer's weight in the form ``ops`` multiply by."""
        return ops.pack_linear_weight(self.weight.data)

    def fits(self, packed: PackedLinear) -> bool:
        """Whether ``packed`` (kept by an earlier load) has the shape and kind ``pack`` makes."""
        return not packed.gate_up and (packed.out_features, packed.in_features) == (self.out_features,
                                                                                    self.in_features)

    def finalize(self, ops: Ops) -> None:
        """Pack the weight for ``ops``, unless a packed form was restored (``restore_packed``), and
        drop the unpacked one."""
        super().finalize(ops)
        if self._packed is None:
            self._packed = self.pack(ops)
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def restore_packed(self, packed: PackedLinear) -> None:
        """Adopt a weight packed earlier for the same kernels; ``finalize`` then packs nothing."""
        if not self.fits(packed):
            raise ValueError(f"a packed weight of {packed.out_features}x{packed.in_features} "
                             f"(gate_up={packed.gate_up}) does not fit this {type(self).__name__}")
        self._packed = packed
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def route(self, steps: list[tuple[int, PackedLinear]]) -> None:
        """Multiply by ``form`` from ``min_rows`` rows of input on, for each ``(min_rows, form)`` step
        (the first step starts at 1, and its form replaces the packed weight)."""
        self._packed = steps[0][1]
        self._routes = tuple(steps) if len(steps) > 1 else ()

    def move_to_huge_pages(self, arena: HugePageArena) -> int:
        """Move every form of the weight into ``arena``; returns the bytes moved."""
        moved: dict[int, PackedLinear] = {}  # by the old form's id: a form may serve several routes
        nbytes = 0

        def move(form: PackedLinear) -> PackedLinear:
            nonlocal nbytes
            if id(form) not in moved:
                moved[id(form)] = new = form.on_huge_pages(arena)
                nbytes += new.nbytes if new is not form else 0
            return moved[id(form)]

        if self._packed is not None:
            self._packed = move(self._packed)
        self._routes = tuple((rows, move(form)) for rows, form in self._routes)
        return nbytes

    @property
    def packed_nbytes(self) -> int:
        """Bytes of every form of the weight this layer holds (the kernel choice may keep two)."""
        forms = [self._packed, *(form for _, form in self._routes)]
        return sum({id(f.data): f.nbytes for f in forms if f is not None}.values())

    def for_rows(self, x: torch.Tensor) -> PackedLinear | None:
        """The form of the weight that multiplies ``x`` (by its number of rows)."""
        packed = self._packed
        if self._routes:
            rows = x.numel() // max(1, x.shape[-1])
            for min_rows, form in self._routes:
                if rows >= min_rows:
                    packed = form
        return packed

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        packed = self.for_rows(x)
        if packed is None:
            w = self.weight
            return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
        assert self.ops is not None, "finalize(ops) runs before the first forward"
        return self.ops.linear(x, packed, bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks. ``output_sizes`` lists merged sub-matrices (gate|up)."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, state: ParallelState = SINGLE) -> None:
        self.local_sizes = [size // state.world_size for size in output_sizes]
        for size in output_sizes:
            if size % state.world_size:
                raise ValueError(f"{size} output features cannot be split over {state.world_size} ranks")
        super().__init__(in_features, sum(self.local_sizes), bias, dtype, state)

    def _place(self, param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        index = 0 if part is None else int(part)
        offset = sum(self.local_sizes[:index])
        local = shard(full, Split.COLUMN, self.state.rank, self.state.world_size)
        param.data.narrow(0, offset, self.local_sizes[index]).copy_(local)

    load_weight = _place
    load_bias = _place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class GateUpSwiGLU(ColumnParallelLinear):
    """SwiGLU's merged gate|up projection with the activation fused in: ``silu(x G^T) * (x U^T)``
    for this rank's share of the intermediate features.

    One pass over the weights (``Ops.linear_silu_mul``) instead of a projection and then
    ``silu_and_mul``: a few percent faster on the CPU kernels (0-10% over M 1-512, never measurably
    slower; ``benchmarks/kernels_cpu.py --only fused``), the same arithmetic on the pure-torch ones.
    The kernels have no fused form with a bias; then it projects and multiplies in two steps.
    """

    def __init__(self, in_features: int, intermediate_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, state: ParallelState = SINGLE) -> None:
        super().__init__(in_features, [intermediate_size, intermediate_size], bias, dtype, state)

    def pack(self, ops: Ops) -> PackedLinear:
        if self.bias is not None:
            return super().pack(ops)
        gate, up = self.weight.data.split(self.local_sizes)
        return ops.pack_gate_up_weight(gate, up)

    def fits(self, packed: PackedLinear) -> bool:
        if self.bias is not None:
            return super().fits(packed)
        return packed.gate_up and (packed.out_features, packed.in_features) == (self.local_sizes[0],
                                                                                self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.for_rows(x)
        if packed is not None and packed.gate_up:
            assert self.ops is not None, "finalize(ops) runs before the first forward"
            return self.ops.linear_silu_mul(x, packed)
        y = self.matmul(x, self.bias)
        if self.ops is not None:
            return self.ops.silu_and_mul(y)
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up


class QKVParallelLinear(LinearBase):
    """The merged q|k|v projection, split by attention heads (see ``sharding`` for uneven splits).

    Checkpoints store q, k and v either apart (loaded with part ``"q"``, ``"k"``, ``"v"``) or fused in
    one tensor (part ``None``): ``fused="qkv"`` for [q | k | v] blocks (GPT-2), ``"per_head"`` for
    [heads, (q, k, v), head_dim] rows (GPT-NeoX, BLOOM).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, state: ParallelState = SINGLE, fused: str | None = None) -> None:
        if fused is not None and fused not in FUSED_LAYOUTS:
            raise ValueError(f"unknown fused q/k/v layout {fused!r}; known: {', '.join(FUSED_LAYOUTS)}")
        if fused == "per_head" and num_kv_heads != num_heads:
            raise ValueError(f"a per-head fused q/k/v needs as many KV heads as query heads, "
                             f"got {num_kv_heads} and {num_heads}")
        self.head_dim, self.fused = head_dim, fused
        self.layout = HeadLayout(num_heads, head_dim, num_kv_heads)
        self.num_heads = len(query_heads(num_heads, state.world_size, state.rank))
        self.num_kv_heads = len(kv_heads(num_heads, num_kv_heads, state.world_size, state.rank))
        self.local_sizes = {"q": self.num_heads * head_dim, "k": self.num_kv_heads * head_dim,
                            "v": self.num_kv_heads * head_dim}
        super().__init__(hidden_size, sum(self.local_sizes.values()), bias, dtype, state)

    def _place(self, param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        if part is None:
            for name, piece in zip("qkv", self._unfuse(full), strict=True):
                self._place(param, piece, name)
            return
        offset = {"q": 0, "k": self.local_sizes["q"], "v": self.local_sizes["q"] + self.local_sizes["k"]}[part]
        split = Split.HEADS if part == "q" else Split.KV_HEADS
        local = shard(full, split, self.state.rank, self.state.world_size, self.layout)
        param.data.narrow(0, offset, self.local_sizes[part]).copy_(local)

    def _unfuse(self, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q_rows = self.layout.num_heads * self.head_dim
        kv_rows = (self.layout.num_kv_heads or self.layout.num_heads) * self.head_dim
        if self.fused == "qkv":
            return tuple(full.split([q_rows, kv_rows, kv_rows], dim=0))
        if self.fused == "per_head":
            by_head = full.reshape(self.layout.num_heads, 3, self.head_dim, *full.shape[1:])
            return tuple(by_head[:, i].reshape(q_rows, *full.shape[1:]) for i in range(3))
        raise ValueError("a fused q/k/v checkpoint tensor needs QKVParallelLinear(fused=...)")

    load_weight = _place
    load_bias = _place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial sums are all-reduced here, then the bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, state: ParallelState = SINGLE,
                 in_split: HeadLayout | None = None) -> None:
        # ``in_split`` splits the input by whole heads (o_proj after attention heads were split).
        self.in_split = in_split
        if in_split is not None:
            local_in = len(query_heads(in_split.num_heads, state.world_size, state.rank)) * in_split.head_dim
        else:
            if in_features % state.world_size:
                raise ValueError(f"{in_features} input features cannot be split over {state.world_size} ranks")
            local_in = in_features // state.world_size
        super().__init__(local_in, out_features, bias, dtype, state)

    def load_weight(self, param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        if self.in_split is not None:
            local = shard(full.t(), Split.HEADS, self.state.rank, self.state.world_size, self.in_split).t()
        else:
            local = shard(full, Split.ROW, self.state.rank, self.state.world_size)
        param.data.copy_(local)

    def load_bias(self, param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        param.data.copy_(full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.state.all_reduce(self.matmul(x, None))
        return y if self.bias is None else y + self.bias.to(y.dtype)


class VocabParallelEmbedding(Module):
    """Embedding rows split by (padded) vocabulary; each rank looks up its own ids, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 state: ParallelState = SINGLE) -> None:
        super().__init__()
        self.state = state
        self.vocab_size = vocab_size
        self.local_rows = pad_vocab(vocab_size, state.world_size) // state.world_size
        self.start = state.rank * self.local_rows
        self.weight = _param((self.local_rows, hidden_size), dtype, self.load_weight)

    def load_weight(self, param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        param.data.copy_(shard(full, Split.VOCAB, self.state.rank, self.state.world_size))

    def forward(self, ids: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if self.state.world_size == 1:
            return F.embedding(ids, self.weight).to(out_dtype)
        local = ids - self.start
        outside = (local < 0) | (local >= self.local_rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight).to(out_dtype)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.state.all_reduce(x)


class ParallelLMHead(LinearBase):
    """Logits over a vocabulary split by rows; gathered to full width on every rank."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 state: ParallelState = SINGLE, bias: bool = False) -> None:
        self.vocab_size = vocab_size
        local_rows = pad_vocab(vocab_size, state.world_size) // state.world_size
        super().__init__(hidden_size, local_rows, bias, dtype, state)

    def load_weight(self, param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        param.data.copy_(shard(full, Split.VOCAB, self.state.rank, self.state.world_size))

    load_bias = load_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.state.all_gather_last_dim(self.matmul(x, self.bias))
        return logits[..., :self.vocab_size]


class ReplicatedLinear(LinearBase):
    """A small projection every rank holds whole (OPT's project_in/project_out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, state: ParallelState = SINGLE) -> None:
        super().__init__(in_features, out_features, bias, dtype, state)

    def load_weight(self, param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        param.data.copy_(full)

    load_bias = load_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


def conv1d_checkpoint(layer: L) -> L:
    """Let ``layer`` load GPT-2 style Conv1D weights, which checkpoints store [in, out], not [out, in]."""
    load = layer.weight.weight_loader  # type: ignore[attr-defined]

    def load_transposed(param: nn.Parameter, full: torch.Tensor, part: Any = None) -> None:
        load(param, full.t(), part)

    layer.weight.weight_loader = load_transposed  # type: ignore[attr-defined]
    return layer
