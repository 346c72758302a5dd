"""The kernel interface the model layers call, the base of the layers that call it, and the one place
that picks an implementation."""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch
from torch import nn

from lmserve.kernels.build import load_cpu_kernels
from lmserve.kernels.packed import PackedLinear
from lmserve.kernels.reference import ReferenceOps


class Ops(Protocol):
    """What a model needs from its device's kernels. Activations are fp32 on the CPU.

    - ``pack_linear_weight(w[N, K]) -> PackedLinear``: once at load time.
    - ``pack_gate_up_weight(gate[I, K], up[I, K]) -> PackedLinear``: for ``linear_silu_mul``.
    - ``linear(x[..., K], w, bias=None) -> [..., N]``: ``x W^T + bias``.
    - ``linear_silu_mul(x[..., K], w) -> [..., I]``: ``silu(x G^T) * (x U^T)`` in one pass.
    - ``silu_and_mul(x[..., 2I]) -> [..., I]``.
    - ``argmax_rows(x[M, N]) -> [M]`` int64: each row's first largest value, as ``torch.argmax``.
    - ``rms_norm(x, weight, eps, residual=None) -> (normed, x + residual)``.
    - ``rotary_embedding(positions[T], q[T, Hq, D], k[T, Hk, D], cos, sin, rotary_dim, neox_style)``:
      in place.
    - ``write_kv(k[T, Hkv, D], v, k_cache, v_cache, slot_mapping[T])``: in place.
    - ``paged_attention(q[T, Hq, D], k_cache, v_cache, block_tables[S, B] int32, context_lens[S]
      int32, query_start_loc[S + 1] int32, scale, alibi_slopes=None, out=None) -> [T, Hq, D]``.

    Caches are ``[num_blocks, block_size, Hkv, D]`` (bf16 or fp32, block_size a power of two).
    ``ReferenceOps`` documents each op's exact semantics.
    """

    name: str

    @property
    def fast_bf16(self) -> bool: ...

    def pack_linear_weight(self, w: torch.Tensor) -> PackedLinear: ...

    def pack_gate_up_weight(self, gate: torch.Tensor, up: torch.Tensor) -> PackedLinear: ...

    def linear(self, x: torch.Tensor, w: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor: ...

    def linear_silu_mul(self, x: torch.Tensor, w: PackedLinear) -> torch.Tensor: ...

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor: ...

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor: ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rotary_embedding(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, rotary_dim: int, neox_style: bool) -> None: ...

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None: ...

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        scale: float, alibi_slopes: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor: ...


class Module(nn.Module):
    """An ``nn.Module`` whose call is its ``forward``, without torch's hook machinery: lmserve's
    layers register no hooks, and torch checks for them on every call (~0.75 us). A decode step of a
    small model makes a few hundred such calls (11 a Llama layer), which is 0.4 ms of the default
    model's 5 ms int4 token."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # Children are kept in the instance dict too, where Python finds them before torch's
    # ``__getattr__`` (which looks through its own dicts, ~0.5 us): a decode step reads ~300 of them.
    # Only children: ``.to()`` may replace a parameter object behind ``__setattr__``'s back.
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self.__dict__.get("_modules", ()):  # a child was set (or cleared to None)
            self.__dict__[name] = self._modules[name]

    def __delattr__(self, name: str) -> None:
        if name in self._modules:
            self.__dict__.pop(name, None)
        super().__delattr__(name)


class KernelModule(Module):
    """A layer that runs on the device's kernels.

    The model loader calls ``finalize(ops)`` on every one once the weights are in place (and before
    the first forward); a layer that keeps its weight in a kernel-specific form packs it there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Ops | None = None

    def finalize(self, ops: Ops) -> None:
        """Run on ``ops`` from now on."""
        self.ops = ops


_lock = threading.Lock()
_by_device_type: dict[str, Ops] = {}


def get_ops(device: torch.device | str = "cpu") -> Ops:
    """The kernels for ``device``: compiled ones on capable x86 CPUs (AVX-512, else AVX2 + FMA for
    the linear layers; built and probed on first call, cached on disk; ``LMSERVE_CPU_KERNELS=0``
    turns them off, ``LMSERVE_CPU_ISA`` forces a build), Triton attention on CUDA (``LMSERVE_TRITON=0``
    turns it off), the pure-torch ones everywhere else."""
    kind = torch.device(device).type
    with _lock:
        ops = _by_device_type.get(kind)
        if ops is None:
            ops = _choose(kind)
            _by_device_type[kind] = ops
        return ops


def _choose(kind: str) -> Ops:
    if kind == "cpu":
        ext = load_cpu_kernels()
        if ext is not None:
            from lmserve.kernels.build import ISAS
            from lmserve.kernels.cpu import CpuOps, PanelLinearOps

            return PanelLinearOps(ext) if ISAS[ext.lmserve_isa].gemm_only else CpuOps(ext)
    if kind == "cuda":
        from lmserve.kernels.cuda import cuda_ops

        return cuda_ops()
    return ReferenceOps(kind)
