"""One line naming the CPU a benchmark ran on, with the instruction-set flags that decide its kernels."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that change which kernel is fastest (x86 vector widths, dot-product and matrix units,
# ARM's equivalents); the rest of /proc/cpuinfo's list does not move these benchmarks.
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
                     "amx_int8", "asimd", "asimddp", "bf16", "i8mm", "sve")


def describe_cpu(cpuinfo: str | None = None) -> str:
    """``model name, N cores, flags: ...`` from ``/proc/cpuinfo`` (or the text given)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    present = [flag for flag in FLAGS_THAT_MATTER if flag in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(present) or 'none of note'}"
