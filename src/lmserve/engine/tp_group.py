"""Rank 0 of a tensor-parallel group, as the engine sees it: a ``Runner`` whose steps run on every rank.

The engine's process is rank 0: it loads its own ``ModelRunner`` and drives ranks 1..N-1 through a
``lmserve.parallel.supervisor.Supervisor`` (spawning, step broadcast, watchdog, heartbeat). Each
worker runs ``lmserve.parallel.worker.worker_main`` with a ``ModelRunner`` of its own, built from
the same configuration. Every rank then agrees on the smallest KV-cache size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from collections.abc import Sequence

import torch

from lmserve.config.settings import EngineConfig
from lmserve.engine.kv_cache import KVCacheSpec
from lmserve.engine.model_runner import ModelRunner
from lmserve.engine.request import Request
from lmserve.kernels.device import resolve_device
from lmserve.models.config import ModelConfig
from lmserve.parallel.group import threads_per_rank
from lmserve.parallel.step import StepInputs
from lmserve.parallel.supervisor import start_group
from lmserve.parallel.worker import agree_on_kv_blocks

log = logging.getLogger(__name__)


def rank_config(config: EngineConfig, degree: int, device_type: str) -> EngineConfig:
    """What each rank's ``ModelRunner`` gets: its share of the host's cores and, on the CPU (where
    all ranks share one memory), its share of the KV-cache memory budget."""
    if device_type != "cpu":
        return config
    return dataclasses.replace(config, num_threads=config.num_threads or threads_per_rank(degree),
                               kv_cache_memory_fraction=config.kv_cache_memory_fraction / degree)


class TPGroup:
    """Rank 0 of a tensor-parallel group; implements ``lmserve.engine.runner.Runner``."""

    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("this process already runs a tensor-parallel group; one per process "
                               "(shut the previous engine's runner down first)")
        self.degree = degree = config.tensor_parallel_degree
        device_type = resolve_device(config.device).type
        config = rank_config(config, degree, device_type)
        self._supervisor = supervisor = start_group(degree, device_type,
                                                    functools.partial(ModelRunner, config, progress=False))
        # The finalizer holds the supervisor, not this object: dropping the engine stops the workers.
        self._finalizer = weakref.finalize(self, supervisor.close)
        try:
            self.runner = ModelRunner(config, supervisor.group.state, progress=progress)
            supervisor.wait_until_loaded()
            agree_on_kv_blocks(self.runner, supervisor.group)
        except BaseException:
            supervisor.fail("rank 0 could not start")
            self._finalizer()
            raise
        supervisor.watch()
        log.info("tensor-parallel group of %d ranks ready (workers: pids %s)", degree, self.worker_pids)

    @property
    def worker_pids(self) -> list[int | None]:
        return self._supervisor.worker_pids

    # -- Runner: rank 0's model and cache describe the group's --------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        return self.runner.model_config

    @property
    def kv_spec(self) -> KVCacheSpec:
        return self.runner.kv_spec

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    def prepare(self, requests: Sequence[Request], num_new_tokens: Sequence[int]) -> StepInputs:
        return self.runner.prepare(requests, num_new_tokens)

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Broadcast the step to every rank, run rank 0's share, return its logits."""
        return self._supervisor.step(inputs, self.runner.execute)

    def shutdown(self) -> None:
        """Stop the workers and leave the process group; the runner cannot be used afterwards."""
        self._finalizer()
