"""The engine's runner: what it drives each step, and the one place that chooses it.

``make_runner`` checks the tensor-parallel degree against the checkpoint before any process starts,
converts the checkpoint to its pre-sharded form when that pays, and returns a ``ModelRunner`` at
degree 1 or a ``TPGroup`` (rank 0 of a group of processes) above it. Both implement ``Runner``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from lmserve.config.settings import EngineConfig
from lmserve.engine.kv_cache import KVCacheSpec
from lmserve.engine.model_runner import ModelRunner
from lmserve.engine.request import Request
from lmserve.engine.tp_group import TPGroup
from lmserve.errors import ConfigError
from lmserve.kernels.device import resolve_device, resolve_dtype
from lmserve.models.checkpoint import CheckpointInfo, describe_checkpoint
from lmserve.models.config import ModelConfig
from lmserve.parallel.group import check_degree
from lmserve.parallel.state import ParallelState
from lmserve.parallel.step import StepInputs

log = logging.getLogger(__name__)


class Runner(Protocol):
    """A loaded model and its KV cache, on one device or spread over a tensor-parallel group."""

    @property
    def model_config(self) -> ModelConfig: ...

    @property
    def kv_spec(self) -> KVCacheSpec: ...

    @property
    def num_blocks(self) -> int:
        """KV-cache blocks, the same on every rank."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def prepare(self, requests: Sequence[Request], num_new_tokens: Sequence[int]) -> StepInputs:
        """The step's flat token batch: every request's next ``n`` uncomputed tokens, in order."""

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run the step on every rank; float32 logits [rows to sample, vocab] on the CPU, or None
        when no request samples."""

    def shutdown(self) -> None:
        """Release what the runner started (worker processes); it cannot be used afterwards."""


def make_runner(config: EngineConfig, progress: bool = True) -> Runner:
    """The runner for ``config``: its checkpoint converted first where that pays (see
    ``lmserve.convert.conversion_pays``), then one ``ModelRunner`` or a tensor-parallel group."""
    degree = config.tensor_parallel_degree
    device = resolve_device(config.device)
    model_dir = Path(config.model)
    dtype = resolve_dtype(config.dtype, device)
    info = describe_checkpoint(model_dir, dtype, device, config.max_model_len)
    check_degree(degree, info.config.num_heads, device.type)
    if degree > 1:
        check_layers_split(info, degree)
    _convert_if_it_pays(model_dir, degree, dtype, progress)
    if degree == 1:
        return ModelRunner(config, progress=progress)
    return TPGroup(config, progress=progress)


def check_layers_split(info: CheckpointInfo, degree: int) -> None:
    """Build rank 0's (uninitialised) model to see that every layer splits ``degree`` ways, before
    any process starts; a layer that cannot says which size does not divide."""
    try:
        info.empty_model(ParallelState(0, degree))
    except ValueError as exc:
        raise ConfigError("tensor_parallel_degree", degree, f"a degree this model's layers split into; {exc}") from exc


def _convert_if_it_pays(model_dir: Path, degree: int, dtype: torch.dtype, progress: bool) -> None:
    from lmserve.convert import conversion_pays, ensure_converted

    if not conversion_pays(model_dir, degree, dtype):
        return
    try:
        ensure_converted(model_dir, degree, dtype, progress=progress)
    except OSError as exc:  # a full disk or read-only cache costs speed, not the ability to serve
        log.warning("could not cache a pre-sharded conversion (%s); loading %s directly", exc, model_dir)
