"""The compiled CPU kernels behind the ``Ops`` interface: every op from the AVX-512 build
(``CpuOps``); from the AVX2 one (``PanelLinearOps``) all but argmax, SwiGLU alone and encoder
attention.

Anything the compiled library does not cover (other devices, head sizes without a compiled kernel)
is handed to the pure-torch ops this class inherits, so callers never need to know which path ran.
The wrappers stay thin on purpose: reshaping and dtype conversion happen in C++, because at decode
batch sizes a few microseconds of Python per call are a visible share of a layer.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from lmserve.kernels.build import cpu_flags
from lmserve.kernels.packed import PackedLinear
from lmserve.kernels.quant import DOT_LAYOUTS, QuantLinear
from lmserve.kernels.reference import ReferenceOps

_PLAIN, _SILU_MUL = 0, 1  # lmserve::Epilogue in csrc/kernels.h
_CACHE_DTYPES = (torch.bfloat16, torch.float32)


class PanelLinearOps(ReferenceOps):
    """What every compiled build of ``ext`` has (the AVX2 build alone, ``build.py``): linear layers on
    its GEMMs (bf16 panels or quantized weights, fp32 compute), attention, RMS norm, rotary embedding
    and cache writes; the other ops in pure torch. Threads follow ``torch.get_num_threads()``."""

    name = "cpu-gemm"

    def __init__(self, ext: ModuleType) -> None:
        super().__init__("cpu")
        self.ext = ext
        self.name = f"cpu-{getattr(ext, 'lmserve_isa', 'avx512')}"
        # The layouts of quantized weights this build multiplies by int8-rounded activations
        # (``quant.to_vnni``), and so the ones weights are packed in here: faster than the weight-only
        # kernels at every M measured. AVX-512 with VNNI: vpdpbusd (1, 8, 128 rows; a busy 2-core
        # EPYC). AVX2: vpmaddubsw + vpmaddwd, 4-bit 1.2x at one row and 1.0-1.6x at 2-200 rows, int8
        # 1.05-1.4x at 1-200 rows (a 49152 x 576 vocabulary head 1.27x at one row, 1.36x at 16; 2-core
        # AMD EPYC, Zen 3). None with LMSERVE_QUANT_VNNI=0; an AVX-512 build without VNNI has none.
        isa = getattr(ext, "lmserve_isa", "avx512")
        self.dot_layouts: tuple[str, ...] = ()
        if os.environ.get("LMSERVE_QUANT_VNNI", "1") != "0" and (isa == "avx2" or "avx512_vnni" in cpu_flags()):
            self.dot_layouts = DOT_LAYOUTS

    @property
    def fast_bf16(self) -> bool:
        return True

    # -- linear layers -----------------------------------------------------------------------
    # Panels hold bf16: only bf16 weights go there. fp32 weights keep their precision (MKL fp32 is
    # as fast as these kernels at large M); fp16 weights are widened to fp32 by the fallback.
    # Packed by the compiled routine (csrc/pack.cpp), which writes the same panels as
    # ``packed.pack_panels`` several times faster than torch's strided copies.
    def pack_linear_weight(self, w: torch.Tensor) -> PackedLinear:
        if w.device.type != "cpu" or w.dim() != 2 or w.dtype != torch.bfloat16:
            return super().pack_linear_weight(w)
        panels = self.ext.pack_linear(w, False, None, torch.get_num_threads())
        return PackedLinear(panels, w.shape[0], w.shape[1], layout="panel32")

    def pack_gate_up_weight(self, gate: torch.Tensor, up: torch.Tensor) -> PackedLinear:
        if gate.device.type != "cpu" or gate.dim() != 2 or gate.dtype != torch.bfloat16:
            return super().pack_gate_up_weight(gate, up)
        if up.shape != gate.shape or up.dtype != gate.dtype:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} weights must have the same shape")
        panels = self.ext.pack_linear(gate, False, up, torch.get_num_threads())  # gate, up panels alternating
        return PackedLinear(panels, gate.shape[0], gate.shape[1], layout="panel32", gate_up=True)

    def linear(self, x: torch.Tensor, w: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, QuantLinear) and not w.gate_up and x.device.type == "cpu":
            return self._quant(x, w, bias)
        if w.layout == "pair32" and not w.gate_up:
            return self.ext.linear_dot(x, w.data, w.out_features, bias, _PLAIN, torch.get_num_threads())
        if w.layout != "panel32" or w.gate_up:
            return super().linear(x, w, bias)
        return self.ext.linear(x, w.data, w.out_features, bias, _PLAIN, torch.get_num_threads())

    def linear_silu_mul(self, x: torch.Tensor, w: PackedLinear) -> torch.Tensor:
        if isinstance(w, QuantLinear) and w.gate_up and x.device.type == "cpu":
            return self._quant(x, w, None)
        if w.layout == "pair32" and w.gate_up:
            return self.ext.linear_dot(x, w.data, w.out_features, None, _SILU_MUL, torch.get_num_threads())
        if w.layout != "panel32" or not w.gate_up:
            return super().linear_silu_mul(x, w)
        return self.ext.linear(x, w.data, w.out_features, None, _SILU_MUL, torch.get_num_threads())

    def _quant(self, x: torch.Tensor, w: QuantLinear, bias: torch.Tensor | None) -> torch.Tensor:
        # Int8-dot layouts this build does not take (packed on another machine, or switched off) go to
        # torch: the AVX-512 build's vpdpbusd would fault on a CPU without VNNI.
        if not hasattr(self.ext, "linear_quant") or (w.layout in DOT_LAYOUTS and w.layout not in self.dot_layouts):
            return super().linear_silu_mul(x, w) if w.gate_up else super().linear(x, w, bias)
        return self.ext.linear_quant(x, w.data, w.scales, w.mins if w.mins.numel() else None, w.out_features,
                                     w.group, w.kernel_bits, bias, w.gate_up, torch.get_num_threads())

    # -- what both builds compile around the GEMMs -----------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.device.type != "cpu":
            return super().rms_norm(x, weight, eps, residual)
        return self.ext.rms_norm(x, weight, eps, residual, torch.get_num_threads())

    def rotary_embedding(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, rotary_dim: int, neox_style: bool) -> None:
        if q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32:
            return super().rotary_embedding(positions, q, k, cos, sin, rotary_dim, neox_style)
        self.ext.rotary_embedding(positions, q, k, cos, sin, rotary_dim, neox_style, torch.get_num_threads())

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        if k_cache.device.type != "cpu" or k_cache.dtype not in _CACHE_DTYPES:
            return super().write_kv(k, v, k_cache, v_cache, slot_mapping)
        self.ext.write_kv(k, v, k_cache, v_cache, slot_mapping, torch.get_num_threads())

    # CpuOps adds the choice of the bf16 dot-product loop for prefill tiles (``attention_dot``).
    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        scale: float, alibi_slopes: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        if (q.device.type != "cpu" or k_cache.dtype not in _CACHE_DTYPES
                or not self.ext.attention_supports_head_dim(q.shape[-1])):
            return super().paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                           scale, alibi_slopes, out)
        return self.ext.paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                        float(scale), alibi_slopes, out, torch.get_num_threads(),
                                        getattr(self, "attention_dot", False))


class CpuOps(PanelLinearOps):
    """Every op from the compiled AVX-512 extension ``ext``."""

    # Prefill tiles over a bf16 cache with vdpbf16ps (``attention_prefill_dot.h``); set where the
    # CPU has the instructions and they measured faster (``kernels/choice.py``).
    attention_dot = False

    # -- elementwise -------------------------------------------------------------------------
    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 2 or x.dtype != torch.float32 or x.shape[1] == 0:
            return super().argmax_rows(x)
        return self.ext.argmax_rows(x, torch.get_num_threads())

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().silu_and_mul(x)
        return self.ext.silu_and_mul(x, torch.get_num_threads())
