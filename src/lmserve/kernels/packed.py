"""Linear weights prepared once at load time for the kernel that will multiply by them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PANEL = 32  # output columns per packed panel: one 64-byte line of bf16 per input feature


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
