"""KV-cache sizing on CUDA: option.gpu_memory_utilization means what it means in vLLM; and the CPU
cache's memory (huge pages, private) and its idle-time warming.

The budget is computed by pure functions, so the arithmetic is checked here on the CPU; the
device check of the real allocation runs where a GPU is lent.
"""

from __future__ import annotations

import pytest

from lmserve.engine.kv_cache import activation_reserve, cuda_cache_budget
from lmserve.errors import OutOfMemoryError

GIB = 1 << 30


def test_budget_is_the_share_of_total_memory_less_weights_and_activations() -> None:
    # An 80 GiB GPU holding 16 GiB of weights (64 GiB free), 2 GiB of activation reserve, at 0.9:
    # the engine may use 72 GiB in all, so the cache gets 72 - 16 - 2 = 54 GiB (not 0.9 x 64 = 57.6).
    assert cuda_cache_budget(free=64 * GIB, total=80 * GIB, memory_fraction=0.9, reserve=2 * GIB) == 54 * GIB


def test_memory_others_hold_counts_against_the_share() -> None:
    # 60 GiB in use (weights plus another process): at 0.95 the engine may reach 76 GiB, so the
    # cache gets 76 - 60 - 1 = 15 GiB and the device keeps 4 GiB of headroom.
    budget = cuda_cache_budget(free=20 * GIB, total=80 * GIB, memory_fraction=0.95, reserve=1 * GIB)
    assert budget == 15 * GIB


def test_a_share_the_weights_already_fill_is_refused_by_name() -> None:
    with pytest.raises(OutOfMemoryError) as err:
        cuda_cache_budget(free=60 * GIB, total=80 * GIB, memory_fraction=0.25, reserve=1 * GIB)
    assert "option.gpu_memory_utilization=0.25" in str(err.value) and "20.00 GiB" in str(err.value)


def test_activation_reserve_grows_with_the_step_and_the_vocabulary() -> None:
    # Llama-3-8B-like shapes in bf16 at a 4096-token step and 64 logit rows.
    llama = activation_reserve(4096, 64, hidden_size=4096, intermediate_size=14336, vocab_size=128256, act_bytes=2)
    assert 0.3 * GIB < llama < 2 * GIB
    assert activation_reserve(8192, 64, 4096, 14336, 128256, 2) > llama
    assert activation_reserve(4096, 256, 4096, 14336, 128256, 2) > llama


def test_idle_warming_of_the_cpu_cache_runs_on_the_calling_thread_only() -> None:
    """Mapping never-used blocks is idle-time work: torch's thread pool would take every core from
    whatever else runs on the machine (another server's burst), so it stays on one thread."""
    import threading
    import time

    import psutil
    import torch

    from lmserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache, fault_in

    torch.set_num_threads(2)
    torch.ones(1 << 22).mul_(2.0)  # start the pool's threads, as a served model has
    time.sleep(0.2)  # and let them stop spinning at the barrier, which would count as their work
    spec = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, dtype=torch.bfloat16)
    caches = allocate_kv_cache(spec, 16384, torch.device("cpu"))  # 256 MiB of never-touched pages
    me = threading.get_native_id()

    def cpu_by_thread() -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}

    before = cpu_by_thread()
    fault_in(caches, 0, 16384)
    after = cpu_by_thread()
    others = sum(after[t] - before.get(t, 0.0) for t in after if t != me)
    mine = after[me] - before[me]
    assert mine > 0.02  # the work was done, here
    # A pool sharing the work would take about half of it; a tick or two (CPU times count in 10 ms)
    # is any other thread of the test process.
    assert others < 0.25 * mine
    assert all(not k.any() and not v.any() for k, v in caches)


def test_the_cpu_cache_is_private_memory_in_huge_pages_where_the_kernel_has_them() -> None:
    """A fresh block's first write costs a page fault: one per 2 MiB of a layer's keys, not one per
    4 KiB, where transparent huge pages are on (``always`` or ``madvise``); and a forked child never
    shares the cache, so no copy-on-write lands on a step's writes."""
    from pathlib import Path

    import torch

    from lmserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("no transparent huge pages on this machine")
    spec = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, dtype=torch.bfloat16)
    caches = allocate_kv_cache(spec, 4096, torch.device("cpu"))  # 32 MiB a layer's keys
    k = caches[0][0]
    k[:1024].fill_(1.0)  # 8 MiB of fresh blocks, as a burst of prompts writes them
    start = k.data_ptr()
    mapping, huge_kib, inside = "", 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header: range perms offset ...
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            inside = lo <= start < hi
            if inside:
                mapping = fields[1]
        elif inside and fields[0] == "AnonHugePages:":
            huge_kib = int(fields[1])
    assert mapping == "rw-p"  # private
    assert huge_kib >= 4096  # most of the 8 MiB written sits in 2 MiB pages
