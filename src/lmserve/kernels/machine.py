"""What this machine is, for keying what was learned about it (ISA probes, kernel timings) on disk.

Nothing here assumes x86 or Linux: where ``/proc/cpuinfo`` is missing or says other things (ARM
lists ``Features``, not ``flags``), the flags are empty and the model name falls back to
``platform``'s description, so callers simply find no x86 instruction sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import signal
import subprocess
from pathlib import Path
from typing import Any

from lmserve.fsutil import write_text_atomic

log = logging.getLogger(__name__)

# The flags that decide which kernels can run and which are fast; the report prints these.
FLAGS_THAT_MATTER = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                     "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")


def _cpuinfo_field(*names: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in names:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The feature flags of this CPU as Linux reports them (x86 ``flags``, ARM ``Features``); empty
    where ``/proc/cpuinfo`` is missing."""
    value = _cpuinfo_field("flags", "features")
    return set(value.split()) if value else set()


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s), or the best description ``platform`` has."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def machine_key(**extra: Any) -> dict[str, Any]:
    """The identity of this machine and software: CPU model, all CPU flags, torch and oneDNN
    versions, plus ``extra`` (the kernel build key, thread count ...). Whatever is cached under it
    is valid only for an exactly equal key."""
    import torch

    onednn = getattr(torch.backends.mkldnn, "version", None)
    return {"cpu_model": cpu_model(), "cpu_flags": sorted(cpu_flags()), "machine": platform.machine(),
            "torch": torch.__version__, "onednn": str(onednn()) if callable(onednn) else "", **extra}


def key_digest(key: dict[str, Any]) -> str:
    """A short name for ``key``, for file names; the full key is stored inside and compared."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def keyed_file(stem: str, key: dict[str, Any]) -> Path:
    """The kernel cache's file for ``stem`` under ``key``: ``<stem>-<key digest>.json``, one per key,
    so that what was measured under another key (another install, thread count or build) stays beside
    it instead of being replaced."""
    from lmserve.cache import cache_subdir

    return cache_subdir("kernels") / f"{stem}-{key_digest(key)}.json"


def read_keyed(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The ``data`` stored at ``path`` under exactly ``key``; None (logged) when the file is missing,
    unreadable, truncated, corrupt or was written for another key: such a file is never trusted."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s); it will be rebuilt", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("data"), dict):
        log.warning("ignoring %s: written for another machine or software version; it will be rebuilt", path)
        return None
    data: dict[str, Any] = doc["data"]
    return data


def write_keyed(path: Path, key: dict[str, Any], data: dict[str, Any]) -> None:
    """Store ``data`` under ``key`` at ``path`` in one step (readers see the old or the new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": key, "data": data}, indent=1, sort_keys=True))


def probe_path(name: str, key: dict[str, Any]) -> Path:
    """Where the verdict of probe ``name`` under ``key`` is kept: one file per key, so that two
    installs on one machine (another Python, another lmserve version: another kernel build) keep
    their verdicts side by side instead of replacing each other's, and re-probing, on every switch."""
    return keyed_file(f"probe-{name}", key)


def probe_verdict(name: str, key: dict[str, Any], command: list[str], timeout_s: float) -> str | None:
    """Run ``command`` (a child process that tries something that may fault, e.g. an instruction set)
    and return None when it exits 0, else why not. Success, and death by a signal (an illegal
    instruction), are facts about the machine: kept in the cache under ``key`` and not tried again.
    An ordinary failure (exit code, timeout) is retried next time."""
    path = probe_path(name, key)
    known = read_keyed(path, key)
    if known is not None and isinstance(known.get("ok"), bool):
        return None if known["ok"] else str(known.get("reason", f"an earlier {name} probe failed"))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"the {name} probe did not finish in {timeout_s:.0f} s"
    if done.returncode == 0:
        write_keyed(path, key, {"ok": True})
        return None
    if done.returncode < 0:
        sig = -done.returncode
        sig_name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        why = f"the {name} probe was killed by {sig_name} when tried in a child process"
        write_keyed(path, key, {"ok": False, "reason": why})
        return why
    return f"the {name} probe failed: {done.stderr.strip()[-400:]}"
