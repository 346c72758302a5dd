"""Build a model of the right family from a checkpoint directory, on one tensor-parallel rank."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from lmserve.errors import UnsupportedModelError
from lmserve.kernels import KernelModule, Ops
from lmserve.kernels.choice import ChoiceTable, choosable, choose
from lmserve.kernels.packed import HugePageArena
from lmserve.models.checkpoint import describe_checkpoint
from lmserve.models.config import ModelConfig
from lmserve.models.quantize import cache_name, check_mode, quantize_model, weight_bytes
from lmserve.models.weights import load_weights
from lmserve.parallel.layers import LinearBase, ParallelLMHead
from lmserve.parallel.presharded import find_conversion, load_rank, remember_packed
from lmserve.parallel.state import SINGLE, ParallelState

log = logging.getLogger(__name__)


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device, ops: Ops,
               max_model_len: int | None = None, state: ParallelState = SINGLE,
               progress: bool = False, quantize: str = "none") -> tuple[nn.Module, ModelConfig]:
    """Instantiate the family's model, load and shard its weights, and prepare them for ``ops``
    (linear weights quantized as ``quantize`` says, see ``models.quantize``).

    A matching pre-sharded conversion (``model_dir`` itself, or one in the cache) is loaded as is.
    """
    if check_mode(quantize) != "none" and device.type != "cpu":
        raise UnsupportedModelError(f"quantize={quantize!r} runs on the CPU kernels; on {device.type} use "
                                    "quantize='none'")
    info = describe_checkpoint(model_dir, dtype, device, max_model_len)
    model = info.empty_model(state)
    conversion = find_conversion(model_dir, state.world_size, dtype)
    packed = conversion is not None and load_rank(model, conversion, state.rank, ops, cache_name(quantize, ops))
    if conversion is None:
        load_weights(model, model_dir, info.family.weights, progress=progress)
    if not packed:
        quantize_model(model, quantize, model_dir, info.family.weights, state, ops)
    model = model.to(device)
    for module in model.modules():
        if isinstance(module, KernelModule):
            module.finalize(ops)
    if conversion is not None and not packed:
        remember_packed(model, conversion, state.rank, ops, cache_name(quantize, ops))
    total, linear = weight_bytes(model)
    log.info("weights: %.1f MiB in memory, %.1f MiB of them linear layers (quantize=%s)", total / 2**20,
             linear / 2**20, quantize)
    model.eval()
    return model, info.config


# Linear weights smaller than this stay where they are: they fit in the last-level cache of most
# server CPUs, so decode does not stream them from memory, and moving them would only cost load time.
HUGE_PAGE_MIN_WEIGHT_BYTES = 64 << 20


def linear_weights_on_huge_pages(model: nn.Module) -> None:
    """Move the CPU linear weights, in their final forms, onto transparent huge pages
    (``kernels.packed.HugePageArena``), when they are ``HUGE_PAGE_MIN_WEIGHT_BYTES`` or more."""
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    if sum(m.packed_nbytes for m in linears) < HUGE_PAGE_MIN_WEIGHT_BYTES:
        return
    start, arena = time.perf_counter(), HugePageArena()
    moved = sum(m.move_to_huge_pages(arena) for m in linears)
    if moved:
        log.info("%.0f MiB of linear weights on huge pages in %.2fs", moved / 2**20, time.perf_counter() - start)


def choose_linear_kernels(model: nn.Module, ops: Ops, max_rows: int, max_seqs: int) -> ChoiceTable:
    """Route every linear layer to the implementation measured fastest on this machine for each
    row count it will see (``kernels/choice.py``): up to ``max_rows`` (the step's token budget), the
    vocabulary head up to ``max_seqs`` (it multiplies only the rows sampled from). Layers without a
    choice stay as they are."""
    linears = [m for m in model.modules() if isinstance(m, LinearBase) and choosable(m.packed)]
    table = choose(ops, [(m.packed, min(max_rows, max_seqs) if isinstance(m, ParallelLMHead) else max_rows)
                         for m in linears])
    before = sum(layer.packed_nbytes for layer in linears)
    for layer in linears:
        assert layer.packed is not None  # choosable() checked it
        layer.route(table.forms(layer.packed))
    after = sum(layer.packed_nbytes for layer in linears)
    if after != before:
        log.info("the linear kernel choice holds %.0f MiB of linear weights (%+.0f MiB for second forms)",
                 after / 2**20, (after - before) / 2**20)
    return table
