"""What a checkpoint directory holds, read once: its model family and the model's configuration.

The live loader, the converter and the engine's checks before it starts any rank all open a
checkpoint here, so they agree on what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmserve.models.config import ModelConfig, build_model_config, read_hf_config
from lmserve.models.registry import resolve_architecture
from lmserve.parallel.state import SINGLE, ParallelState


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's family (a ``CausalLM`` class with its ``weights`` map) and model config."""

    config: ModelConfig
    family: type[Any]

    @property
    def family_name(self) -> str:
        """``module:Class`` of the family, as manifests record it."""
        return f"{self.family.__module__}:{self.family.__qualname__}"

    def empty_model(self, state: ParallelState = SINGLE) -> nn.Module:
        """One rank's model built on the CPU, its weights not loaded yet. A layer that cannot be
        split ``state.world_size`` ways raises ``ValueError`` saying which size does not divide."""
        with torch.device("cpu"):
            model: nn.Module = self.family(self.config, state)
        return model


def describe_checkpoint(model_dir: Path, dtype: torch.dtype, device: torch.device,
                        max_model_len: int | None = None) -> CheckpointInfo:
    """Read ``model_dir/config.json``, find the family its ``architectures`` name, and build the
    model config for serving in ``dtype`` on ``device``. Raises ``UnsupportedModelError`` for a
    directory without a config, an unknown architecture, or a ``max_model_len`` beyond the model's."""
    hf = read_hf_config(model_dir)
    architecture, family = resolve_architecture(hf.get("architectures"))
    return CheckpointInfo(build_model_config(model_dir, architecture, hf, dtype, device, max_model_len), family)
