"""Pure-torch kernels: the specification the compiled ones are tested against, and the ops used on
CUDA, on CPUs without AVX-512, and wherever the compiled extension cannot be built.

Every op here has the exact signature and semantics of its compiled counterpart (see ``ops.Ops``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.kernels.packed import PackedLinear
from lmserve.kernels.quant import QuantLinear, reference_linear
from lmserve.kernels.reference_attention import paged_attention


class ReferenceOps:
    """Kernels written with torch operators only; correct on any device, fast on none in particular."""

    name = "reference"

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type

    @property
    def fast_bf16(self) -> bool:
        """Whether bf16 weights run at least as fast as fp32 ones with these ops."""
        return self.device_type == "cuda" and torch.cuda.is_bf16_supported()

    # -- linear layers -----------------------------------------------------------------------
    def pack_linear_weight(self, w: torch.Tensor) -> PackedLinear:
        """Prepare ``W[N, K]`` for :meth:`linear`. To fuse projections that read the same input
        (q|k|v, gate|up as plain outputs) pack ``torch.cat`` of them and split the output."""
        return PackedLinear(self._plain(w), w.shape[0], w.shape[1])

    def pack_gate_up_weight(self, gate: torch.Tensor, up: torch.Tensor) -> PackedLinear:
        """Prepare a SwiGLU pair (each ``[I, K]``) for :meth:`linear_silu_mul`."""
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} weights must have the same shape")
        return PackedLinear(self._plain(torch.cat([gate, up])), gate.shape[0], gate.shape[1], gate_up=True)

    def _plain(self, w: torch.Tensor) -> torch.Tensor:
        # CPU matmuls in bf16 are slow and round the activations; fp32 (MKL) is faster and exact.
        if w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16):
            return w.float()
        return w

    def linear(self, x: torch.Tensor, w: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x[..., K]``; returns ``x``'s dtype."""
        if w.gate_up:
            raise ValueError("a gate|up weight packed by pack_gate_up_weight goes to linear_silu_mul, not linear")
        return self._matmul(x, w, bias)

    def linear_silu_mul(self, x: torch.Tensor, w: PackedLinear) -> torch.Tensor:
        """``silu(x @ G^T) * (x @ U^T)`` for a weight from :meth:`pack_gate_up_weight`."""
        if not w.gate_up:
            raise ValueError("linear_silu_mul needs a weight packed by pack_gate_up_weight")
        return self.silu_and_mul(self._matmul(x, w, None))

    def _matmul(self, x: torch.Tensor, w: PackedLinear, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(w, QuantLinear):
            return reference_linear(x, w, bias)
        if w.layout != "plain":
            raise ValueError(f"weight layout {w.layout!r} was packed for other kernels than {self.name!r}")
        data = w.data
        y = F.linear(x.to(data.dtype), data, None if bias is None else bias.to(data.dtype))
        return y.to(x.dtype)

    # -- elementwise -------------------------------------------------------------------------
    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The index of each row's largest value of a 2-D ``x`` (the first on ties), as int64."""
        return x.argmax(dim=-1)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(x[..., :I]) * x[..., I:]``."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(x + residual) * weight, x + residual)``; without residual the second is ``x``.
        Computed in fp32, returned in ``x``'s dtype; the inputs are not modified."""
        total = x if residual is None else x + residual
        t32 = total.float()
        normed = t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        return normed.to(x.dtype), total

    def rotary_embedding(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, rotary_dim: int, neox_style: bool) -> None:
        """Rotate the first ``rotary_dim`` features of every head of ``q[T, Hq, D]`` and ``k[T, Hk, D]``
        in place, by the angles of ``positions`` in the ``[max_pos, rotary_dim / 2]`` tables.
        ``neox_style`` pairs feature ``i`` with ``i + rotary_dim / 2``; otherwise ``2i`` with ``2i + 1``."""
        c = cos.index_select(0, positions).unsqueeze(1)
        s = sin.index_select(0, positions).unsqueeze(1)
        for x in (q, k):
            rot = x[..., :rotary_dim]
            r32 = rot.float()
            if neox_style:
                x1, x2 = r32.chunk(2, dim=-1)
                new = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
            else:
                x1, x2 = r32[..., 0::2], r32[..., 1::2]
                new = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
            rot.copy_(new)

    # -- attention ---------------------------------------------------------------------------
    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store new keys/values ``[T, Hkv, D]`` at cache slots ``block * block_size + offset``."""
        slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
        for src, cache in ((k, k_cache), (v, v_cache)):
            nb, bs = cache.shape[:2]
            src = src.to(cache.dtype)
            if cache.stride(0) == bs * cache.stride(1):
                cache.view(nb * bs, *cache.shape[2:]).index_copy_(0, slots, src)
            else:
                cache[slots // bs, slots % bs] = src

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        scale: float, alibi_slopes: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of new tokens ``q[T, Hq, D]`` over each sequence's paged keys/values.

        Sequence ``s`` owns rows ``query_start_loc[s]:query_start_loc[s+1]`` of ``q`` and has
        ``context_lens[s]`` tokens in the cache, these included (write_kv first), so its ``i``-th new
        token sits at position ``context_lens[s] - n_new + i``. Query head ``h`` reads KV head
        ``h // (Hq // Hkv)``. ALiBi adds ``slope[h] * (key_pos - query_pos)`` to the scores.
        """
        result = paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
                                 alibi_slopes)
        if out is None:
            return result
        out.copy_(result)
        return out
