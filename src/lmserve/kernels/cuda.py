"""The CUDA ops: torch's own bf16 matmuls and elementwise ops (``ReferenceOps``), with paged attention
from the Triton kernel, which reads the block table in place, never syncs with the host, and so can
be captured in a CUDA graph. Without Triton (or with ``LMSERVE_TRITON=0``) the pure-torch attention
is used, and decode steps run eagerly (it reads lengths on the host)."""

from __future__ import annotations

import torch

from lmserve.kernels import triton as triton_kernels
from lmserve.kernels.reference import ReferenceOps


class CudaOps(ReferenceOps):
    """``ReferenceOps`` with the Triton paged-attention kernel."""

    name = "cuda-triton"
    graph_safe = True  # no op reads device values on the host: a forward can be graph-captured

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
