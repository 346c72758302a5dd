"""Sizing and allocating the paged KV cache."""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass

import torch

from lmserve.errors import OutOfMemoryError

log = logging.getLogger(__name__)

_CPU_SHARE_OF_AVAILABLE = 0.25  # the CPU cache takes at most this share of available memory by default
_DEFAULT_MEMORY_FRACTION = 0.9  # EngineConfig.kv_cache_memory_fraction's default


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()


def available_memory(device: torch.device) -> int:
    """Bytes the cache may still take on ``device`` (free GPU memory, or MemAvailable on the host)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def plan_num_blocks(spec: KVCacheSpec, device: torch.device, tokens: int | None, memory_fraction: float,
                    wanted_tokens: int, nbytes: int | None = None) -> int:
    """Blocks to allocate: ``tokens`` if given, else ``nbytes`` worth; else what fits the memory
    budget, capped at what ``wanted_tokens`` (max_num_seqs x max_model_len) could ever use."""
    if tokens is None and nbytes is not None:
        tokens = nbytes // spec.bytes_per_token
    if tokens is None:
        # On the CPU the fraction scales the CPU cap, so replicas that split the fraction split the cap.
        share = memory_fraction if device.type == "cuda" else (
            _CPU_SHARE_OF_AVAILABLE * min(1.0, memory_fraction / _DEFAULT_MEMORY_FRACTION))
        budget = int(available_memory(device) * share)
        tokens = min(budget // spec.bytes_per_token, wanted_tokens)
    num_blocks = max(tokens // spec.block_size, 0)
    if num_blocks < 1:
        raise OutOfMemoryError(f"no room for even one KV block of {spec.block_size} tokens "
                               f"({spec.bytes_per_token} bytes per token) on {device}")
    return num_blocks


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (key, value) pair per layer, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
    shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    try:
        cache = _zeros_on_demand(shape, spec.dtype) if device.type == "cpu" else torch.zeros(shape, dtype=spec.dtype,
                                                                                              device=device)
    except (RuntimeError, OSError, torch.OutOfMemoryError) as exc:
        raise OutOfMemoryError(f"cannot allocate a KV cache of {num_blocks} blocks on {device}: {exc}") from exc
    return [(cache[i, 0], cache[i, 1]) for i in range(spec.num_layers)]


def _zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor on anonymous memory the kernel zero-fills page by page as it is first touched.

    ``torch.zeros`` writes every byte at start (seconds for a multi-GiB CPU cache) and commits memory the
    cache may never use; these pages cost nothing until a block is written. The tensor holds the map.
    """
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).view(shape)
