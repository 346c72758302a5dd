"""Build a model of the right family from a checkpoint directory, on one tensor-parallel rank."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lmserve.kernels import KernelModule, Ops
from lmserve.models.config import ModelConfig, build_model_config, read_hf_config
from lmserve.models.registry import resolve_architecture
from lmserve.models.weights import load_weights
from lmserve.parallel.presharded import find_conversion, load_rank, remember_packed
from lmserve.parallel.state import SINGLE, ParallelState

log = logging.getLogger(__name__)


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device, ops: Ops,
               max_model_len: int | None = None, state: ParallelState = SINGLE,
               progress: bool = False) -> tuple[nn.Module, ModelConfig]:
    """Instantiate the family's model, load and shard its weights, and prepare them for ``ops``.

    A matching pre-sharded conversion (``model_dir`` itself, or one in the cache) is loaded as is.
    """
    hf = read_hf_config(model_dir)
    architecture, cls = resolve_architecture(hf.get("architectures"))
    cfg = build_model_config(model_dir, architecture, hf, dtype, device, max_model_len)
    with torch.device("cpu"):
        model = cls(cfg, state)
    conversion = find_conversion(model_dir, state.world_size, dtype)
    packed = conversion is not None and load_rank(model, conversion, state.rank, ops)
    if conversion is None:
        load_weights(model, model_dir, cls.weights, progress=progress)
    model = model.to(device)
    for module in model.modules():
        if isinstance(module, KernelModule):
            module.finalize(ops)
    if conversion is not None and not packed:
        remember_packed(model, conversion, state.rank, ops)
    model.eval()
    return model, cfg
