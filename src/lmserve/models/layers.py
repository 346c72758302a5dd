"""Blocks shared by model families: norms, activations, rotary embeddings and paged attention."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.errors import UnsupportedModelError
from lmserve.kernels import KernelModule, Module, Ops


@dataclass
class ForwardContext:
    """What one forward pass needs besides token ids and positions (built by the model runner).

    ``slot_mapping[t]`` is the KV-cache slot (block * block_size + offset) of new token ``t``;
    sequence ``s`` owns new tokens ``query_start_loc[s]:query_start_loc[s+1]`` and has
    ``context_lens[s]`` tokens in all, including these; ``block_tables[s]`` lists its blocks.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ops: Ops
    sampled: SampledRows | None = None  # set when the last layer need finish only the sampled rows


@dataclass
class SampledRows:
    """The rows a step samples from, when each is the last new token of its sequence (no prompt
    logprobs): the last layer writes every row's keys and values, but its attention, output
    projection and MLP run on these rows only. Their attention is decode-shaped: one query per
    sequence, over that sequence's whole context."""

    rows: torch.Tensor  # indices into the step's tokens, in the order the logits come out
    block_tables: torch.Tensor  # of the rows' sequences
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor  # 0, 1, ..., len(rows)

    @staticmethod
    def of(logits_indices: torch.Tensor, query_start_loc: torch.Tensor, block_tables: torch.Tensor,
           context_lens: torch.Tensor) -> SampledRows | None:
        """The sampled rows of a step, or None when finishing only them saves nothing (every row is
        sampled) or is not allowed (a sampled row that is not its sequence's last: prompt logprobs)."""
        rows = logits_indices
        if rows.numel() == int(query_start_loc[-1]):
            return None
        ends = query_start_loc[1:].to(torch.int64) - 1
        seqs = torch.searchsorted(ends, rows)
        if rows.numel() and (int(seqs.max()) >= ends.numel() or not torch.equal(ends[seqs], rows)):
            return None
        return SampledRows(rows, block_tables.index_select(0, seqs), context_lens.index_select(0, seqs),
                           torch.arange(rows.numel() + 1, dtype=query_start_loc.dtype))

    def to(self, device: torch.device) -> SampledRows:
        return SampledRows(self.rows.to(device), self.block_tables.to(device), self.context_lens.to(device),
                           self.query_start_loc.to(device))


def each_layer(layers: nn.ModuleList, ctx: ForwardContext) -> Iterator[tuple[nn.Module, SampledRows | None]]:
    """A decoder stack's layers, each with the rows it finishes: every row (None), but in the last
    layer ``ctx.sampled``."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        yield layer, ctx.sampled if i == last else None


def take(x: torch.Tensor, sampled: SampledRows | None) -> torch.Tensor:
    """``x``'s sampled rows, or all of them when the step finishes every row."""
    return x if sampled is None else x.index_select(0, sampled.rows)


class CausalLM(Module):
    """A family's top module: a decoder stack ``self.model`` and a vocabulary head ``self.lm_head``.

    Families build both in ``__init__`` under their checkpoint's names; the engine calls ``forward``
    for hidden states and ``compute_logits`` for the rows it samples from.
    """

    model: nn.Module
    lm_head: nn.Module
    # Whether ``forward`` honours ``ctx.sampled`` (returns only those rows' hidden states).
    finishes_sampled_rows_only = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class RMSNorm(KernelModule):
    """Root-mean-square norm in float32; with ``residual`` it first adds it (fused pre-norm step)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ops is not None:
            normed, total = self.ops.rms_norm(x, self.weight, self.eps, residual)
            return normed, total
        if residual is not None:
            x = x + residual
        residual = x
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype), residual


class LayerNorm(Module, nn.LayerNorm):
    """LayerNorm computed in float32, returning the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.layer_norm(x.float(), self.normalized_shape, None if self.weight is None else self.weight.float(),
                            None if self.bias is None else self.bias.float(), self.eps).to(x.dtype)


class Embedding(Module, nn.Embedding):
    """A plain lookup table (learned positions), called as every lmserve layer is."""


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


Activation = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, Activation] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": _gelu_tanh,  # the tanh approximation, under the names checkpoints use for it
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "bloom_gelu": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def get_activation(name: str) -> Activation:
    """The activation a config names (``hidden_act`` / ``activation_function``)."""
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.), as BLOOM computes them, for any head count."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** i for i in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class RotaryEmbedding(KernelModule):
    """Rotary position embedding over the first ``rotary_dim`` features of each head.

    ``neox_style`` rotates the two halves of the rotary features (Llama, GPT-NeoX); otherwise
    interleaved pairs are rotated (GPT-J).
    """

    cos: torch.Tensor  # [max_position, rotary_dim / 2] float32 tables (buffers)
    sin: torch.Tensor

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, base: float,
                 neox_style: bool = True, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.rotary_dim, self.neox_style = head_dim, rotary_dim, neox_style
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
        positions = torch.arange(max_position, dtype=torch.float64)
        inv_freq, positions = _apply_rope_scaling(inv_freq, positions, scaling)
        freqs = torch.outer(positions, inv_freq)
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q``: [T, Hq, D], ``k``: [T, Hk, D]; returns them rotated (in place when the kernels can)."""
        # The ops rotate in place in the dtypes they list (float32 only, unless they say more).
        in_place = getattr(self.ops, "rotary_in_place_dtypes", (torch.float32,))
        if self.ops is not None and q.dtype in in_place and q.stride(-1) == 1 and k.stride(-1) == 1:
            self.ops.rotary_embedding(positions, q, k, self.cos, self.sin, self.rotary_dim, self.neox_style)
            return q, k
        # Every layer rotates at the same positions in a step: gather cos/sin once per positions tensor.
        if self._step is None or self._step[0] is not positions:
            cos = self.cos.index_select(0, positions).unsqueeze(1)
            sin = self.sin.index_select(0, positions).unsqueeze(1)
            self._step = (positions, cos, sin)
        _, cos, sin = self._step
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :self.rotary_dim].float(), x[..., self.rotary_dim:]
        if self.neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        out = out.to(x.dtype)
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


_SHARED_ROPE: dict[tuple[Any, ...], RotaryEmbedding] = {}


def get_rope(head_dim: int, rotary_dim: int, max_position: int, base: float, neox_style: bool = True,
             scaling: dict[str, Any] | None = None) -> RotaryEmbedding:
    """A rotary embedding shared by every layer with the same settings (one table, one gather per step)."""
    key = (head_dim, rotary_dim, max_position, base, neox_style, repr(sorted((scaling or {}).items())))
    rope = _SHARED_ROPE.get(key)
    if rope is None:
        rope = _SHARED_ROPE[key] = RotaryEmbedding(head_dim, rotary_dim, max_position, base, neox_style, scaling)
    return rope


def _apply_rope_scaling(inv_freq: torch.Tensor, positions: torch.Tensor,
                        scaling: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv_freq, positions
    assert scaling is not None
    if kind == "linear":
        return inv_freq, positions / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), positions
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3")


class PagedAttention(Module):
    """Writes this step's keys and values into the paged cache, then attends over each sequence."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_index: int,
                 scale: float | None = None, alibi_slopes: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_index = layer_index
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.alibi_slopes: torch.Tensor | None
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)  # moves with the model

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                sampled: SampledRows | None = None) -> torch.Tensor:
        """Attention output for every row, or with ``sampled`` for those rows only (keys and values
        of every row are written either way)."""
        n = q.shape[0]
        k_cache, v_cache = ctx.kv_caches[self.layer_index]
        ctx.ops.write_kv(k.reshape(n, self.num_kv_heads, self.head_dim), v.reshape(n, self.num_kv_heads, self.head_dim),
                         k_cache, v_cache, ctx.slot_mapping)
        tables, lens, starts = ctx.block_tables, ctx.context_lens, ctx.query_start_loc
        if sampled is not None:
            q = q.reshape(n, -1).index_select(0, sampled.rows)
            n = q.shape[0]
            tables, lens, starts = sampled.block_tables, sampled.context_lens, sampled.query_start_loc
            if n == 0:
                return q.new_empty(0, self.num_heads * self.head_dim)
        out = ctx.ops.paged_attention(q.reshape(n, self.num_heads, self.head_dim), k_cache, v_cache, tables, lens,
                                      starts, self.scale, self.alibi_slopes)
        return out.reshape(n, self.num_heads * self.head_dim)
