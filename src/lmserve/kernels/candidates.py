"""The implementations a linear layer may run on, and which of them run on this machine.

A candidate is a way to prepare a weight (:class:`Candidate`) from the packed bf16 panels; all of
them run through the same ``Ops.linear`` / ``linear_silu_mul``, which dispatch on the prepared
layout. Quantized layouts plug in by adding a candidate that prepares their layout from the layer's
weight. Which candidate is fastest for each shape is measured in ``kernels/choice.py``; whether one
runs here at all is asked of the CPU's flags and then tried in a child process (``why_not_runnable``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmserve.kernels.packed import PANEL, PackedLinear, pack_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One implementation of a linear layer: how to prepare its weight from the panels."""

    name: str
    prepare: Callable[[PackedLinear], PackedLinear]
    bytes_per_weight: int  # memory of its form, per weight element


def _panel_rows(w: PackedLinear) -> torch.Tensor:
    """The padded ``[panels * 32, K]`` rows ``w``'s panels hold (gate and up panels alternating)."""
    panels, k, _ = w.data.shape
    return w.data.view(panels, k, 16, 2).permute(0, 3, 2, 1).reshape(panels * PANEL, k)


def unpack_panels(w: PackedLinear) -> torch.Tensor:
    """The bf16 ``[N, K]`` matrix (``[2I, K]``, gate rows then up rows, for a gate|up pair) that
    ``w``'s panels were packed from."""
    rows = _panel_rows(w)
    k = rows.shape[1]
    if not w.gate_up:
        return rows[: w.out_features].contiguous()
    pairs = rows.view(-1, 2, PANEL, k)  # panels alternate gate, up
    gate, up = (pairs[:, i].reshape(-1, k)[: w.out_features] for i in (0, 1))
    return torch.cat([gate, up])


def _pairs(w: PackedLinear) -> PackedLinear:
    """The panels re-laid for the bf16 dot-product kernel (same padding and gate|up alternation), by
    the compiled kernels that packed them (several times faster than ``pack_pairs``, the same bytes)."""
    from lmserve.kernels.ops import get_ops  # panels exist only where the compiled CPU kernels do

    repack = getattr(getattr(get_ops("cpu"), "ext", None), "panels_to_pairs", None)
    data = repack(w.data, torch.get_num_threads()) if repack else pack_pairs(_panel_rows(w))
    return PackedLinear(data, w.out_features, w.in_features, "pair32", w.gate_up)


def _plain(dtype: torch.dtype) -> Callable[[PackedLinear], PackedLinear]:
    def prepare(w: PackedLinear) -> PackedLinear:
        return PackedLinear(unpack_panels(w).to(dtype), w.out_features, w.in_features, gate_up=w.gate_up)

    return prepare


CANDIDATES: dict[str, Candidate] = {
    "own": Candidate("own", lambda w: w, 2),                        # the compiled panel kernel, fp32 FMA
    "own-dot": Candidate("own-dot", _pairs, 2),                      # the same with vdpbf16ps (AVX512_BF16)
    "torch-bf16": Candidate("torch-bf16", _plain(torch.bfloat16), 2),  # oneDNN bf16 (AMX where present)
    "torch-fp32": Candidate("torch-fp32", _plain(torch.float32), 4),   # MKL fp32
}


# The own kernels' forms: the size of the panels, so the first step of a plan is one of them or a
# candidate that wins outright.
BASES = ("own", "own-dot")
PROBE_TIMEOUT_S = 300.0


def unavailable(name: str, ops: Any = None) -> str | None:
    """Why candidate ``name`` cannot run with ``ops`` on this CPU by what they report, or None."""
    from lmserve.kernels.machine import cpu_flags

    if name != "own-dot":
        return None
    if not hasattr(getattr(ops, "ext", None), "linear_dot"):
        return "the loaded CPU kernels have no bf16 dot-product build"
    return None if "avx512_bf16" in cpu_flags() else "this CPU lacks avx512_bf16"


def why_not_runnable(name: str, ops: Any = None) -> str | None:
    """Why candidate ``name`` cannot run here, or None: by what ``ops`` and the CPU report, then by
    trying it in a child process (the verdict is kept per machine)."""
    from lmserve.kernels.machine import machine_key, probe_verdict

    why = unavailable(name, ops)
    if why is None:
        why = probe_verdict(name, machine_key(candidate=name), _probe_command(name), PROBE_TIMEOUT_S)
    return why


def runnable_candidates(ops: Any = None) -> list[str]:
    """The candidates that run here. torch's own matmuls dispatch on the CPU's features themselves
    (oneDNN picks AMX where the CPU reports it, and some virtual machines report AMX but fault on
    it), and a CPU's flags are not trusted alone for the dot-product kernel either, so each is first
    tried in a child process; one killed by a signal is never timed here."""
    names = ["own"]
    for name in CANDIDATES:
        if name == "own":
            continue
        # A kernel this build or CPU does not have is expected (the AVX2 build on every start, say);
        # one that failed its trial run is not.
        expected = unavailable(name, ops)
        why = expected or why_not_runnable(name, ops)
        if why is None:
            names.append(name)
        else:
            (log.info if expected else log.warning)("not using the %s linear kernel: %s", name, why)
    return names


def _probe_command(name: str) -> list[str]:
    return [sys.executable, "-c", f"from lmserve.kernels.candidates import probe_main; probe_main({name!r})"]


def probe_main(name: str) -> None:
    """The child side of the candidate probe: one prefill-sized product in ``name``'s form."""
    import torch.nn.functional as F

    x, w = torch.randn(64, 256), torch.randn(256, 256)
    if name == "own-dot":
        from lmserve.kernels.build import load_cpu_kernels
        from lmserve.kernels.packed import pack_pairs

        ext = load_cpu_kernels()
        got = ext.linear_dot(x, pack_pairs(w.bfloat16()), 256, None, 0, 1).double()  # type: ignore[union-attr]
        want = x.bfloat16().double() @ w.bfloat16().double().T
        sys.exit(0 if torch.allclose(got, want, rtol=0.05, atol=0.5) else 1)
    dtype = {"torch-bf16": torch.bfloat16, "torch-fp32": torch.float32}[name]
    got = F.linear(x.to(dtype), w.to(dtype)).double()
    want = x.to(dtype).double() @ w.to(dtype).double().T
    sys.exit(0 if torch.allclose(got, want, rtol=0.05, atol=0.5) else 1)
