"""``quantize=``: give every linear layer of a loaded model its quantized weight (before ``finalize``).

``int8``/``int4`` quantize each layer's (already sharded) float weight; ``gguf`` takes the GGUF
import's own blocks (``store.gguf_quant``), placed by the family's weight map like any checkpoint
tensor. Layers that cannot be quantized keep their float weight and are named in one log line.
Embeddings and norms are never quantized. The vocabulary head gets int8 under ``int4`` too, as
llama.cpp's 4-bit files keep it at 6 or 8 bits: its errors reach every logit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from lmserve.config.settings import QUANTIZE_MODES
from lmserve.errors import ConfigError, UnsupportedModelError
from lmserve.kernels import Ops
from lmserve.kernels.quant import (
    DOT_LAYOUTS,
    GROUP,
    Grouped,
    QuantLinear,
    concat,
    kernel_groups_ok,
    layout_tag,
    pack_quant,
    quantize,
    to_vnni,
)
from lmserve.models.weights import WeightMap
from lmserve.parallel.layers import GateUpSwiGLU, LinearBase, ParallelLMHead
from lmserve.parallel.state import ParallelState

log = logging.getLogger(__name__)


def check_mode(mode: str) -> str:
    """``mode`` if it is a ``quantize`` value lmserve serves; a ConfigError naming them otherwise."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError("quantize", mode, f"one of {', '.join(QUANTIZE_MODES)} (awq, gptq, fp8 and the other "
                                            "GPU engines' formats are not supported)")
    return mode


def dot_layouts(ops: Ops | None) -> tuple[str, ...]:
    """The layouts ``ops`` multiply by int8-rounded activations, which weights are packed in for them
    (``kernels.quant.to_vnni``): both with the AVX2 build and on AVX-512 VNNI, none elsewhere."""
    return tuple(getattr(ops, "dot_layouts", ()))


def cache_name(mode: str, ops: Ops) -> str:
    """The name packed ``mode`` weights are cached under: the layouts' version and own groupings
    (``layout_tag``), and the int8-dot layouts used (``-vnni`` for both, else their names)."""
    if mode == "none":
        return mode
    layouts = dot_layouts(ops)
    tag = "" if not layouts else "-vnni" if set(layouts) == set(DOT_LAYOUTS) else "-" + "-".join(sorted(layouts))
    return f"{mode}-{layout_tag(mode)}{tag}"


def quantize_model(model: nn.Module, mode: str, model_dir: Path, weight_map: WeightMap,
                   state: ParallelState, ops: Ops | None = None) -> None:
    """Replace the weight of each linear layer of ``model`` by its ``mode`` form (``restore_packed``),
    in the int8-dot layouts ``ops`` multiply (``dot_layouts``)."""
    if check_mode(mode) == "none":
        return
    linears = {name: m for name, m in model.named_modules() if isinstance(m, LinearBase) and m.packed is None}
    if mode == "gguf":
        if state.world_size > 1:
            raise UnsupportedModelError("quantize='gguf' runs on one rank; with tensor_parallel_degree > 1 use "
                                        "quantize='int8' or 'int4'")
        grouped = gguf_layers(model_dir, weight_map, linears)
    else:
        grouped = {name: g for name, layer in linears.items() if (g := _own(layer, mode)) is not None}
    layouts = dot_layouts(ops)
    for name, g in grouped.items():
        linears[name].restore_packed(to_vnni(pack_layer(linears[name], g), layouts))
    kept = sorted(set(linears) - set(grouped))
    if kept:
        log.info("quantize=%s: %d linear layers keep float weights (e.g. %s)", mode, len(kept), ", ".join(kept[:3]))


def _own(layer: LinearBase, mode: str) -> Grouped | None:
    w = layer.weight.data
    if w.dim() != 2 or not kernel_groups_ok(w.shape[1], GROUP):
        return None
    return quantize(w, "int8" if isinstance(layer, ParallelLMHead) else mode)


def pack_layer(layer: LinearBase, g: Grouped) -> QuantLinear:
    """``g`` (rows as the layer's float weight has them) packed the way ``layer`` multiplies."""
    if g.shape[1] != layer.in_features:
        raise UnsupportedModelError(f"a quantized weight of {g.shape[1]} input features does not fit "
                                    f"{type(layer).__name__} of {layer.in_features}")
    if isinstance(layer, GateUpSwiGLU) and layer.bias is None:
        return pack_quant(g, layer.local_sizes[0], gate_up=True)
    return pack_quant(g.pad_rows(layer.out_features), layer.out_features)


def gguf_layers(model_dir: Path, weight_map: WeightMap, linears: dict[str, LinearBase]) -> dict[str, Grouped]:
    """The GGUF blocks of ``model_dir`` as whole layers: ``{layer name: Grouped}``. A merged layer
    (q|k|v, gate|up) is quantized only when all its parts are; they may mix types."""
    from lmserve.store.gguf_quant import read_blocks

    blocks = read_blocks(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("tie_word_embeddings"):  # the head is the embedding, wherever its name points
        for name, source in weight_map.tied.items():
            if name not in blocks and source in blocks:
                blocks[name] = blocks[source]
    parts: dict[str, dict[Any, Grouped]] = {}
    for ckpt_name, g in blocks.items():
        param, part = weight_map.target(ckpt_name)
        layer, _, kind = param.rpartition(".")
        if kind == "weight" and layer in linears:
            parts.setdefault(layer, {})[part] = g
    out = {}
    for layer, got in parts.items():
        wanted = [part for frag, _, part in weight_map.merged if layer.endswith(frag)] or [None]
        if all(p in got for p in wanted):
            out[layer] = concat([got[p] for p in wanted])
    return out


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(all weight bytes in memory, of which the linear layers'), packed forms counted as packed."""
    linear = sum(m.packed.nbytes for m in model.modules() if isinstance(m, LinearBase) and m.packed is not None)
    rest = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values())
    return linear + rest, linear
