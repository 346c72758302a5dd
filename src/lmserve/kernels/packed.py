"""Linear weights prepared once at load time for the kernel that will multiply by them."""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
from dataclasses import dataclass

import torch

PANEL = 32  # output columns per packed panel: one 64-byte line of bf16 per input feature
HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and most ARM servers


@dataclass(frozen=True)
class PackedLinear:
    """A weight ``W[out_features, in_features]`` in a backend's layout.

    ``layout`` is ``"plain"`` (``data`` is ``W`` itself, maybe in another dtype), ``"panel32"``
    (``data`` is bf16 ``[ceil(out/32), in, 32]``, see :func:`pack_panels`) or ``"pair32"`` (the same
    panels with adjacent input features paired, for the bf16 dot-product kernel, see :func:`pack_pairs`). ``gate_up`` marks a
    SwiGLU gate|up pair, for ``linear_silu_mul`` only; its ``out_features`` is the width of one half.
    """

    data: torch.Tensor
    out_features: int
    in_features: int
    layout: str = "plain"
    gate_up: bool = False

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def on_huge_pages(self, arena: HugePageArena) -> PackedLinear:
        """The same weight with ``data`` copied into ``arena``."""
        moved = arena.copy(self.data)
        return self if moved is self.data else dataclasses.replace(self, data=moved)


class HugePageArena:
    """CPU tensors copied one after another into chunks of private anonymous memory that start on a
    huge-page boundary and are advised for transparent huge pages (``madvise`` mode, the common
    default, backs nothing else with them).

    Decode streams every linear weight once per step. On 4 KiB pages that walks the page tables
    every 4 KiB and the prefetchers stop at each page's end. On a 2-core AMD EPYC, with 2 MiB pages
    the bf16 dot-product GEMM over the layers' weights (the default model's and TinyLlama-1.1B's
    shapes, out of cache) ran 0-8% faster at 1-32 rows and the same at prefill sizes, and whole
    engines decoded one stream 13-17% faster, 16 streams 2-4%. Chunks, not a map per tensor, so
    that weights smaller than a huge page (most of a small model's) share pages too. The kernel
    assembles the pages when the copy first writes them, at load time; where it cannot, the copy
    gets 4 KiB pages and nothing else changes. Each tensor holds its chunk's map.
    """

    CHUNK = 64 << 20
    ALIGN = 64  # a cache line: the kernels' loads of a panel line never straddle two

    def __init__(self) -> None:
        self._buffer: mmap.mmap | None = None
        self._base = self._used = self._size = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` copied into the arena; ``t`` itself when it is not on the CPU or the platform has
        no huge-page advice."""
        if t.device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
            return t
        nbytes = t.numel() * t.element_size()
        if self._buffer is None or self._used + nbytes > self._size:
            self._new_chunk(max(self.CHUNK, -(-nbytes // HUGE_PAGE) * HUGE_PAGE))
        assert self._buffer is not None
        out = torch.frombuffer(self._buffer, dtype=torch.uint8, count=nbytes, offset=self._base + self._used)
        out = out.view(t.dtype).view(t.shape)
        out.copy_(t)
        self._used += -(-nbytes // self.ALIGN) * self.ALIGN
        return out

    def _new_chunk(self, size: int) -> None:
        buffer = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            buffer.madvise(mmap.MADV_HUGEPAGE)
        start = torch.frombuffer(buffer, dtype=torch.uint8, count=1).data_ptr()
        self._buffer, self._base, self._used, self._size = buffer, -start % HUGE_PAGE, 0, size


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """``W[N, K]`` -> bf16 ``[ceil(N/32), K, 32]``, zero-padded, pair-interleaved within each panel.

    Element ``2j`` of a panel row is column ``j`` and element ``2j+1`` column ``16+j``: the kernel
    widens the even and odd halves of one 64-byte load to fp32 with a shift and an AND.
    """
    n, k = w.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=torch.bfloat16, device=w.device)
    padded[:n] = w
    return padded.view(panels, 2, 16, k).permute(0, 3, 2, 1).contiguous().view(panels, k, PANEL)


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows of gate and up padded to whole panels and alternated panel by panel, so one thread's
    slice of the packed weight holds both halves of the columns it produces."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} weights must have the same shape")
    n, k = gate.shape
    panels = -(-n // PANEL)
    halves = []
    for w in (gate, up):
        padded = torch.zeros(panels * PANEL, k, dtype=w.dtype, device=w.device)
        padded[:n] = w
        halves.append(padded.view(panels, PANEL, k))
    return torch.stack(halves, dim=1).view(panels * 2 * PANEL, k)


def pack_pairs(w: torch.Tensor) -> torch.Tensor:
    """``W[N, K]`` -> bf16 ``[ceil(N/32), K + K % 2, 32]``, zero-padded, for ``vdpbf16ps``.

    Each pair of input features ``(2i, 2i+1)`` takes 64 elements of a panel: columns 0-15, then
    16-31, each column's two features adjacent, so one 32-bit lane holds what one dot-product lane
    multiplies.
    """
    n, k = w.shape
    panels, kp = -(-n // PANEL), k + k % 2
    padded = torch.zeros(panels * PANEL, kp, dtype=torch.bfloat16, device=w.device)
    padded[:n, :k] = w
    return padded.view(panels, 2, 16, kp // 2, 2).permute(0, 3, 1, 2, 4).contiguous().view(panels, kp, PANEL)
