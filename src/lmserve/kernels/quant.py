"""Quantized linear weights: one grouped form that every supported format maps onto exactly.

Every format is ``W[n, k] = q[n, k] * scale[n, g] + min[n, g]`` with ``g = k // group`` (no ``min``
means 0). Two kinds of ``q`` cover them all, so two kernels serve every format:

- 8-bit: ``q`` any int8 value. Own ``int8`` (symmetric, group 32), GGUF Q8_0 (group 32, scale d) and
  Q6_K (``q - 32`` in [-32, 31], group 16, scale ``d * sc``).
- 4-bit: ``q`` in 0..15, always with a min. Own ``int4`` (asymmetric, group 32), Q4_0 (``min = -8 d``),
  Q4_1 (``min = m``), Q4_K (group 32, scale ``d * sc``, ``min = -dmin * m``).

The products ``d * sc`` are what llama.cpp computes in fp32 too, so a GGUF file is served in its own
precision. For the kernels (:func:`pack_quant`) the grouped form is cut into panels of 32 output
columns like the bf16 weights: values ``[P, K, 32]`` int8 (4-bit: ``[P, K, 16]`` bytes, byte ``j``
holding column ``j`` in its low nibble and column ``16 + j`` in its high one) and scales/mins
``[P, K / group, 32]`` fp32, so one k-row of a panel dequantizes in registers with two loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmserve.kernels.packed import PANEL, PackedLinear

LAYOUT_VERSION = 3  # bump when a packed layout changes: cached packed weights of older ones are not read
GROUP = 32  # own int4 group, as llama.cpp's Q4_1
# Own int8 groups, the largest that divides K first. Each group costs its scale's bytes and, in the
# VNNI kernel, a conversion and two multiplies per row and 16 columns: interleaved on a 2-core AMD
# EPYC, int8 linears of 576x1536 and 2048x5632 ran 13-23% faster at 16 and 256 rows with groups of
# 128 than of 32; the default model's perplexity (benchmarks/quality.py) moved from +0.36% of bf16 to
# +0.52%.
INT8_GROUPS = (128, 64, GROUP)
DOT_LAYOUTS = ("q8v", "q4v")  # the layouts multiplied by int8-rounded activations (to_vnni)


def layout_tag(mode: str) -> str:
    """What packed ``mode`` weights depend on besides the checkpoint: the layouts' version and, for the
    own modes, the own groupings (both: int4 keeps the LM head in int8), which are part of the name
    their cache is kept under. A change of ``INT8_GROUPS`` or ``GROUP`` then reads none of the
    weights packed with the old ones, without a version bump."""
    if mode not in ("int8", "int4"):
        return f"v{LAYOUT_VERSION}"
    return f"v{LAYOUT_VERSION}-g{'.'.join(str(g) for g in INT8_GROUPS)}-g{GROUP}"


@dataclass(frozen=True)
class Grouped:
    """``W = q * scale + min`` per group of ``group`` input features (see the module docstring)."""

    q: torch.Tensor  # int8 [N, K]; 4-bit values 0..15
    scale: torch.Tensor  # fp32 [N, K // group]
    min: torch.Tensor | None  # fp32 [N, K // group] or None (zero)
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.q.shape[0]), int(self.q.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]``."""
        n, k = self.shape
        w = self.q.float().view(n, k // self.group, self.group) * self.scale.unsqueeze(-1)
        if self.min is not None:
            w = w + self.min.unsqueeze(-1)
        return w.view(n, k)

    def convert(self, bits: int, group: int, with_min: bool) -> Grouped:
        """The same values in a wider form: 4-bit as 8-bit, a group split into smaller ones, a zero
        min added. Exact: only the bookkeeping changes."""
        if bits < self.bits or self.group % group or (self.min is not None and not with_min):
            raise ValueError(f"cannot hold {self.bits}-bit/group {self.group} values as {bits}-bit/group {group}")
        rep = self.group // group
        scale = self.scale.repeat_interleave(rep, dim=1)
        mn = None
        if with_min:
            mn = torch.zeros_like(scale) if self.min is None else self.min.repeat_interleave(rep, dim=1)
        return Grouped(self.q, scale, mn, bits, group)

    def pad_rows(self, rows: int) -> Grouped:
        """Zero rows appended up to ``rows`` (they dequantize to 0)."""
        extra = rows - self.shape[0]
        if extra <= 0:
            return self

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(extra, t.shape[1])])

        return Grouped(pad(self.q), pad(self.scale), None if self.min is None else pad(self.min), self.bits,
                       self.group)


def int8_group(k: int) -> int:
    """The own int8 group for ``k`` input features: the largest of ``INT8_GROUPS`` that divides it."""
    return next((g for g in INT8_GROUPS if k % g == 0), GROUP)


def quantize_int8(w: torch.Tensor, group: int | None = None) -> Grouped:
    """Symmetric int8 per group (``int8_group`` unless given): ``scale = max|w| / 127``."""
    n, k = w.shape
    group = group or int8_group(k)
    g = w.float().view(n, k // group, group)
    scale = g.abs().amax(-1) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(g / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return Grouped(q.view(n, k), scale, None, 8, group)


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> Grouped:
    """Asymmetric 4-bit per group: ``min`` the group's minimum, ``scale = (max - min) / 15``."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round((g - lo.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, 15).to(torch.int8)
    return Grouped(q.view(n, k), scale, lo, 4, group)


def quantize(w: torch.Tensor, mode: str) -> Grouped:
    """``w[N, K]`` quantized as ``mode`` (``int8`` or ``int4``)."""
    if mode == "int8":
        return quantize_int8(w)
    if mode == "int4":
        return quantize_int4(w)
    raise ValueError(f"quantize mode {mode!r} does not quantize a float weight; int8 or int4 do")


def concat(parts: list[Grouped]) -> Grouped:
    """Parts stacked along the output rows, in the narrowest form that holds each exactly."""
    first = parts[0]
    if all((p.bits, p.group, p.min is None) == (first.bits, first.group, first.min is None) for p in parts):
        common = parts
    else:
        group = min(p.group for p in parts)
        with_min = any(p.min is not None for p in parts)
        common = [p.convert(max(p.bits for p in parts), group, with_min) for p in parts]
    mins = [p.min for p in common]
    return Grouped(torch.cat([p.q for p in common]), torch.cat([p.scale for p in common]),
                   None if any(m is None for m in mins) else torch.cat([m for m in mins if m is not None]),
                   common[0].bits, common[0].group)


def kernel_groups_ok(k: int, group: int) -> bool:
    """Whether ``k`` input features split into whole groups (quantization needs it)."""
    return group > 0 and k % group == 0


@dataclass(frozen=True)
class QuantLinear(PackedLinear):
    """A quantized weight in panels (layout ``"q8"``, ``"q4"`` or ``"q8v"``, see the module docstring
    and :func:`to_vnni`).
    ``data`` holds the values; ``mins`` is empty when the format has none."""

    scales: torch.Tensor = torch.empty(0)
    mins: torch.Tensor = torch.empty(0)
    group: int = GROUP

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.mins))

    @property
    def bits(self) -> int:
        return 4 if self.layout in ("q4", "q4v") else 8

    @property
    def kernel_bits(self) -> int:
        """What the compiled kernel is told: 8 or 4, 0 or -4 for the VNNI layouts."""
        return {"q8v": 0, "q4v": -4}.get(self.layout, self.bits)


def _panels(t: torch.Tensor, panels: int) -> torch.Tensor:
    """``[panels * 32, X]`` -> ``[panels, X, 32]``."""
    return t.view(panels, PANEL, t.shape[1]).transpose(1, 2).contiguous()


def pack_quant(g: Grouped, out_features: int | None = None, gate_up: bool = False) -> QuantLinear:
    """Cut ``g`` into panels. For ``gate_up``, ``g`` holds gate rows then up rows (each
    ``out_features``): they are padded to whole panels and alternated panel by panel, as the bf16
    gate|up weights are, so one thread's columns hold both halves."""
    n, k = g.shape
    if gate_up:
        half = out_features if out_features is not None else n // 2
        panels = -(-half // PANEL)
        gate, up = (Grouped(g.q[s], g.scale[s], None if g.min is None else g.min[s], g.bits, g.group)
                    for s in (slice(0, half), slice(half, 2 * half)))
        gate, up = gate.pad_rows(panels * PANEL), up.pad_rows(panels * PANEL)

        def alternate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.stack([a.view(panels, PANEL, -1), b.view(panels, PANEL, -1)], dim=1).view(
                2 * panels * PANEL, -1)

        g = Grouped(alternate(gate.q, up.q), alternate(gate.scale, up.scale),
                    None if gate.min is None or up.min is None else alternate(gate.min, up.min), g.bits, g.group)
        total_panels, width = 2 * panels, half
    else:
        total_panels, width = -(-n // PANEL), n if out_features is None else out_features
        g = g.pad_rows(total_panels * PANEL)
    values = _panels(g.q, total_panels)  # [P, K, 32] int8
    if g.bits == 4:
        u = values.to(torch.uint8)
        values = (u[..., :16] | (u[..., 16:] << 4)).contiguous()  # [P, K, 16]
    scales = _panels(g.scale.float(), total_panels)
    mins = torch.empty(0) if g.min is None else _panels(g.min.float(), total_panels)
    return QuantLinear(values, width, k, layout="q4" if g.bits == 4 else "q8", gate_up=gate_up,
                       scales=scales, mins=mins, group=g.group)


def to_vnni(w: QuantLinear, layouts: tuple[str, ...] = DOT_LAYOUTS) -> QuantLinear:
    """A weight in the layout of the int8-dot kernels, which multiply four unsigned weight bytes by
    four signed activation bytes (vpdpbusd; vpmaddubsw + vpmaddwd on AVX2): per panel, four
    consecutive k of a column side by side. ``"q8v"`` (int8 without mins): ``[P, K/4, 32, 4]`` holding
    value + 128. ``"q4v"``: ``[P, K/4, 64]``, byte ``4c + j`` holding column ``c`` in its low nibble
    and column ``16 + c`` in its high one. Only into ``layouts``; anything else (int8 with mins, a
    layout already converted) is returned as is."""
    if w.layout not in ("q8", "q4") or (w.layout == "q8" and w.mins.numel()) or w.in_features % 4:
        return w
    if {"q8": "q8v", "q4": "q4v"}[w.layout] not in layouts:
        return w
    p, k = int(w.data.shape[0]), w.in_features
    quads = _values(w).to(torch.int16).view(p, k // 4, 4, PANEL).transpose(2, 3)  # [P, K/4, 32, 4]
    if w.layout == "q8":
        data = (quads + 128).to(torch.uint8).reshape(p, k // 4, 4 * PANEL).contiguous()
        return dataclasses.replace(w, data=data, layout="q8v")
    u = quads.to(torch.uint8)
    data = (u[:, :, :16] | (u[:, :, 16:] << 4)).reshape(p, k // 4, 2 * PANEL).contiguous()
    return dataclasses.replace(w, data=data, layout="q4v")


def _values(w: QuantLinear) -> torch.Tensor:
    """The quantized values of any layout as ``[P, K, 32]`` floats."""
    if w.layout == "q4":
        b = w.data
        return torch.cat([(b & 0xF), (b >> 4)], dim=-1).float()
    p, k = int(w.data.shape[0]), w.in_features
    if w.layout == "q8v":
        return w.data.view(p, k // 4, PANEL, 4).transpose(2, 3).reshape(p, k, PANEL).float() - 128.0
    if w.layout == "q4v":
        b = w.data.view(p, k // 4, 16, 4)
        quads = torch.cat([b & 0xF, b >> 4], dim=2)  # [P, K/4, 32, 4]
        return quads.transpose(2, 3).reshape(p, k, PANEL).float()
    return w.data.float()


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x[M, K]`` rounded as the VNNI kernel rounds it: int8 per row and group, scale max|x| / 127."""
    m, k = x.shape
    g = x.float().reshape(m, k // group, group)
    scale = g.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(g * inv) * scale).reshape(m, k)


def dequantize_packed(w: QuantLinear) -> torch.Tensor:
    """The fp32 weight a ``QuantLinear`` multiplies by: ``[N, K]``, or ``cat([gate, up])`` for gate|up
    (the reference the kernels are tested against)."""
    panels, k = int(w.data.shape[0]), w.in_features
    q = _values(w)  # [P, K, 32]
    groups = k // w.group
    q = q.view(panels, groups, w.group, PANEL)
    full = q * w.scales.view(panels, groups, 1, PANEL)
    if w.mins.numel():
        full = full + w.mins.view(panels, groups, 1, PANEL)
    rows = full.view(panels, k, PANEL).transpose(1, 2).reshape(panels * PANEL, k)
    if not w.gate_up:
        return rows[:w.out_features]
    pairs = rows.view(panels // 2, 2, PANEL, k)
    gate = pairs[:, 0].reshape(-1, k)[:w.out_features]
    up = pairs[:, 1].reshape(-1, k)[:w.out_features]
    return torch.cat([gate, up])


def reference_linear(x: torch.Tensor, w: QuantLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequantize(W)^T + bias`` in fp32, returned in ``x``'s dtype."""
    weight = dequantize_packed(w)
    xf = x.float()
    if w.layout in ("q8v", "q4v"):  # the kernel multiplies int8-rounded activations
        xf = quantize_activations(xf.reshape(-1, w.in_features), w.group).reshape(xf.shape)
    y = torch.nn.functional.linear(xf, weight, None if bias is None else bias.float())
    return y.to(x.dtype)
