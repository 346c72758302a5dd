"""The CUDA ops: torch's own bf16 matmuls (``ReferenceOps``), with paged attention, RMS norm and rotary
embedding from Triton kernels. The attention reads the block table in place and never syncs with the
host, so a forward can be captured in a CUDA graph; the fused norm and rotary cut the kernels each
layer launches (one each instead of eight to ten). Without Triton (or with ``LMSERVE_TRITON=0``) the pure-torch attention
is used, and decode steps run eagerly (it reads lengths on the host)."""

from __future__ import annotations

import torch

from lmserve.kernels import triton as triton_kernels
from lmserve.kernels.reference import ReferenceOps


class CudaOps(ReferenceOps):
    """``ReferenceOps`` with Triton paged attention, RMS norm and rotary embedding."""

    name = "cuda-triton"
    graph_safe = True  # no op reads device values on the host: a forward can be graph-captured
    rotary_in_place_dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``ReferenceOps.rms_norm``, in one kernel."""
        from lmserve.kernels.triton.elementwise import rms_norm

        return rms_norm(x, weight, eps, residual)

    def rotary_embedding(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, rotary_dim: int, neox_style: bool) -> None:
        """As ``ReferenceOps.rotary_embedding``, in one kernel, in place."""
        from lmserve.kernels.triton.elementwise import rotary_embedding

        rotary_embedding(positions, q, k, cos, sin, rotary_dim, neox_style)

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__(device_type)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        scale: float, alibi_slopes: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """As ``ReferenceOps.paged_attention``, in one Triton kernel."""
        from lmserve.kernels.triton.paged_attention import paged_attention

        return paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
                               alibi_slopes, out)


def cuda_ops() -> ReferenceOps:
    """The ops for CUDA devices: ``CudaOps`` when Triton can be used, else the pure-torch ones."""
    if triton_kernels.available():
        return CudaOps()
    return ReferenceOps("cuda")
