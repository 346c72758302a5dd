"""Whether prefill attention over a bf16 KV cache runs with bf16 dot products, chosen by measurement.

The compiled attention has two loops for tiles of many query rows (prefill, chunked prefill): fp32
FMA over keys and values widened from the bf16 cache, and ``vdpbf16ps`` over pairs of features and
of keys, half the instructions, with q and the softmax weights rounded to bf16 (what GPU attention
kernels do in bf16). Half the instructions is not half the time everywhere: some CPUs issue the dot
product at half the rate of an FMA. So at model load both are timed on a synthetic prefill of the
model's head layout, and the dot loop is used only where it is ``MIN_GAIN`` faster. The timings are
cached per machine key like the linear kernels' (``kernels/choice.py``), and timings taken beside a
busy process are used for that start only.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

FORCE_ENV = "LMSERVE_ATTENTION_KERNEL"  # auto, fp32 or dot (where the CPU runs it)
LOOPS = ("fp32", "dot")
MIN_GAIN = 1.1  # the dot loop changes rounding: it must be clearly faster to be used
CACHE_VERSION = 1
ROUNDS = 5
PREFILL_TOKENS = 256  # one sequence's prompt, as a prefill step holds it


def dot_available(ops: Any) -> str | None:
    """Why the dot loop cannot run with ``ops`` here, or None: the kernels must have it, and the CPU
    must run the bf16 dot-product instructions (the linear dot-product kernel's check and probe)."""
    from lmserve.kernels.candidates import why_not_runnable

    if not hasattr(ops, "attention_dot"):
        return "the loaded kernels have no bf16 dot-product attention loop"
    return why_not_runnable("own-dot", ops)


def layout_key(num_heads: int, num_kv_heads: int, head_dim: int) -> str:
    return f"{num_heads}/{num_kv_heads}x{head_dim}"


def table_key(ops: Any) -> dict[str, Any]:
    from lmserve.kernels.choice import table_key as linear_key

    return {**linear_key(ops), "attention": CACHE_VERSION}


def prefers_dot(times: dict[str, float]) -> bool:
    """Whether timings ``{"fp32": s, "dot": s}`` choose the dot loop."""
    return times["fp32"] / times["dot"] >= MIN_GAIN


def valid_timings(data: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """The cached layouts, or nothing when any entry is not what this module writes."""
    layouts = (data or {}).get("layouts")
    if isinstance(layouts, dict) and all(
            isinstance(t, dict) and set(t) == {"fp32", "dot"} and all(isinstance(v, float) and v > 0 for v in t.values())
            for t in layouts.values()):  # fmt: skip
        return layouts
    if data is not None:
        log.warning("ignoring a malformed attention-choice cache; measuring again")
    return {}


def measure(ops: Any, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, float]:
    """Seconds per call of each loop on one sequence's prefill of ``PREFILL_TOKENS`` tokens in a
    bf16 cache: the best of a few interleaved rounds."""
    n, block = PREFILL_TOKENS, 16
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(n // block, block, num_kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(n // block, block, num_kv_heads, head_dim, generator=gen).bfloat16()
    q = torch.randn(n, num_heads, head_dim, generator=gen)
    tables = torch.arange(n // block, dtype=torch.int32).view(1, -1)
    lens = torch.tensor([n], dtype=torch.int32)
    starts = torch.tensor([0, n], dtype=torch.int32)
    out = torch.empty_like(q)
    best = {"fp32": float("inf"), "dot": float("inf")}
    saved = ops.attention_dot
    try:
        for r in range(ROUNDS + 1):
            for name in best:
                ops.attention_dot = name == "dot"
                start = time.perf_counter()
                ops.paged_attention(q, k_cache, v_cache, tables, lens, starts, head_dim ** -0.5, None, out)
                if r:  # the first round warms up
                    best[name] = min(best[name], time.perf_counter() - start)
    finally:
        ops.attention_dot = saved
    return best


def choose_attention(ops: Any, num_heads: int, num_kv_heads: int, head_dim: int, cache_dtype: torch.dtype) -> bool:
    """Set ``ops.attention_dot`` for this model's attention and return it: True only for a bf16
    cache on a CPU where the dot loop runs and measured ``MIN_GAIN`` faster (from the cache when it
    has this layout for this machine)."""
    from lmserve.cpu_load import OthersWatch
    from lmserve.errors import ConfigError
    from lmserve.fsutil import file_lock
    from lmserve.kernels.choice import cache_path, cacheable
    from lmserve.kernels.machine import read_keyed, write_keyed

    forced = os.environ.get(FORCE_ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", *LOOPS):
        raise ConfigError(FORCE_ENV, forced, "auto, " + ", ".join(LOOPS), source="environment")
    if not hasattr(ops, "attention_dot"):
        return False
    ops.attention_dot = False
    if cache_dtype != torch.bfloat16 or not ops.ext.attention_supports_head_dim(head_dim) or forced == "fp32":
        return False
    why = dot_available(ops)
    if why is not None:
        (log.warning if forced == "dot" else log.info)("prefill attention: fp32 loop (%s)", why)
        return False
    if forced == "dot":
        ops.attention_dot = True
        return True
    key = table_key(ops)
    path = cache_path(key, "attention")
    layout = layout_key(num_heads, num_kv_heads, head_dim)
    with file_lock(path.with_name(path.name + ".lock")):
        layouts = valid_timings(read_keyed(path, key))
        source = "cache"
        if layout not in layouts:
            source = "measured"
            with OthersWatch() as watch:
                layouts[layout] = measure(ops, num_heads, num_kv_heads, head_dim)
            if cacheable("attention loops", watch, "used for this start, not cached (a quieter start measures "
                         "again)"):
                write_keyed(path, key, {"layouts": layouts})
    times = layouts[layout]
    ops.attention_dot = prefers_dot(times)
    log.info("prefill attention (%s): %s loop (fp32 %.2f ms, bf16 dot %.2f ms per %d-token prefill)", source,
             "bf16 dot" if ops.attention_dot else "fp32", times["fp32"] * 1e3, times["dot"] * 1e3, PREFILL_TOKENS)
    return bool(ops.attention_dot)
