"""Sizing and allocating the paged KV cache.

``option.gpu_memory_utilization`` means what it means in vLLM: on CUDA, the share of the GPU's
*total* memory this engine may use for weights, activations and the KV cache together. The cache
gets that share less what is already in use once the weights are loaded (the weights, the CUDA
context, anything else on the device) and less a reserve for one step's activations. On the CPU,
where memory is shared with everything else on the host, it scales the cache's cap instead (a
quarter of available memory at the default 0.9).
"""

from __future__ import annotations

import contextlib
import ctypes
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


def activation_reserve(step_tokens: int, logit_rows: int, hidden_size: int, intermediate_size: int,
                       vocab_size: int, act_bytes: int) -> int:
    """Bytes to keep free for one engine step's activations: for each of ``step_tokens`` tokens
    the hidden state, its residual and normed copies and q/k/v (about 6 x hidden) and the MLP's
    gate, up and product (3 x intermediate), plus float32 logits and their sampling copy for
    ``logit_rows`` rows. An estimate on the safe side of what the step loop keeps alive at once."""
    per_token = (6 * hidden_size + 3 * intermediate_size) * act_bytes
    return step_tokens * per_token + 2 * logit_rows * vocab_size * 4


def cuda_cache_budget(free: int, total: int, memory_fraction: float, reserve: int) -> int:
    """Bytes the KV cache may take on a GPU (vLLM's meaning of gpu_memory_utilization): the
    fraction of ``total``, less what is in use now (``total - free``: the weights, and whatever
    else holds the device), less the activation ``reserve``. OutOfMemoryError when nothing is left."""
    in_use = total - free
    budget = int(total * memory_fraction) - in_use - reserve
    if budget <= 0:
        gib = 1 << 30
        raise OutOfMemoryError(
            f"option.gpu_memory_utilization={memory_fraction:g} leaves no room for the KV cache: it allows "
            f"{total * memory_fraction / gib:.2f} GiB of the GPU's {total / gib:.2f} GiB, {in_use / gib:.2f} GiB "
            f"is in use with the weights loaded and one step's activations need about {reserve / gib:.2f} GiB; "
            "raise it, or lower option.max_rolling_batch_prefill_tokens")  # fmt: skip
    return budget


def plan_num_blocks(spec: KVCacheSpec, device: torch.device, tokens: int | None, memory_fraction: float,
                    wanted_tokens: int, nbytes: int | None = None, reserve: int = 0) -> int:
    """Blocks to allocate: ``tokens`` if given, else ``nbytes`` worth; else what fits the memory
    budget (see the module docstring; ``reserve`` is the activation reserve on CUDA), capped at
    what ``wanted_tokens`` (max_num_seqs x max_model_len) could ever use."""
    if tokens is None and nbytes is not None:
        tokens = nbytes // spec.bytes_per_token
    if tokens is None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = cuda_cache_budget(int(free), int(total), memory_fraction, reserve)
        else:  # the fraction scales the CPU cap, so replicas that split the fraction split the cap
            share = _CPU_SHARE_OF_AVAILABLE * min(1.0, memory_fraction / _DEFAULT_MEMORY_FRACTION)
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


def fault_in(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], first: int, end: int,
             tensor: int | None = None) -> None:
    """Write zeros over blocks ``first .. end - 1`` of every layer (or only of cache tensor ``tensor``:
    ``2 * layer`` for a layer's keys, ``2 * layer + 1`` for its values), so that their pages are mapped
    before a step writes keys there: on the CPU a page of the cache costs a page fault (1-3 us, more
    in a virtual machine) the first time it is written, ~3% of a prefill that writes fresh blocks.
    Only for blocks no request has held (their content is zero, and nothing reads it).

    On one thread (``memset``, not ``zero_``, which runs on every thread of torch's pool): this is
    idle-time work, and an idle engine must not take cores from whatever else runs on the machine.
    Two servers on two cores, each warming on both after its own burst, stretched the other's next
    burst from 3.1 to 4.6 s (median first token 0.58 -> 1.35 s)."""
    tensors = [t for pair in kv_caches for t in pair]
    for cache in tensors if tensor is None else [tensors[tensor]]:
        part = cache[first:end]  # CPU caches of ``allocate_kv_cache``: a block range of a tensor is contiguous
        assert part.device.type == "cpu" and part.is_contiguous()
        ctypes.memset(part.data_ptr(), 0, part.numel() * part.element_size())


# Private anonymous memory in transparent huge pages where the kernel has them (Linux, ``madvise``
# mode, the common default): a fresh block's first write then costs a fault per 2 MiB of a layer's
# keys or values instead of one per 4 KiB. In a 2-core virtual machine, where a fault costs 5-16 us,
# bursts of 16 prompts of 200 tokens over fresh blocks ran 13% faster in one process (4.2-4.3 ->
# 3.65-3.75 s; writing the keys 0.46 -> 0.33 s, attention 0.63 -> 0.55 s with fewer TLB misses), and a
# server gave 10-12% more output tokens/s in two alternating pairs (405 -> 446, 337 -> 377). Not
# inherited by a forked child, so no copy-on-write ever lands on a step's writes.
_CACHE_ADVICE = [getattr(mmap, name) for name in ("MADV_HUGEPAGE", "MADV_DONTFORK") if hasattr(mmap, name)]


def _zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor on anonymous memory the kernel zero-fills page by page as it is first touched.

    ``torch.zeros`` writes every byte at start (seconds for a multi-GiB CPU cache) and commits memory the
    cache may never use; these pages cost nothing until a block is written. The tensor holds the map.
    """
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
    buffer = mmap.mmap(-1, max(nbytes, 1), **private)
    for advice in _CACHE_ADVICE:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages: 4 KiB pages
            buffer.madvise(advice)
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).view(shape)
