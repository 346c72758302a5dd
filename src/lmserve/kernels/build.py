"""Compiling the CPU kernels once per machine type and loading them.

The extension is built with explicit instruction-set flags, never ``-march=native``: some CPUs report
features (AMX) whose instructions fault under virtualization, and the build cache must not depend on
the machine that happened to compile first. Builds are cached under ``cache_subdir("kernels")``, keyed
by the sources, the flags and the torch version, so only the first import on a machine compiles.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

ENV_SWITCH = "LMSERVE_CPU_KERNELS"
CSRC = Path(__file__).with_name("csrc")
# Sources compiled into the extension; headers only feed the cache key.
SOURCES = ("bindings.cpp", "gemm.cpp", "attention.cpp", "elementwise.cpp", "kv_cache.cpp", "quant_gemm.cpp")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")
COMPILE_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                 "-fopenmp", "-ffp-contract=fast", "-fno-math-errno")

# torch's builder waits forever on the lock file of a compile that was killed; none takes this long.
STALE_LOCK_S = 600.0

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def cpu_flags() -> set[str]:
    """The feature flags of this CPU as Linux reports them (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def disabled_reason() -> str | None:
    """Why the compiled kernels cannot be used here, or None when they can."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_SWITCH}=0"
    if sys.platform != "linux":
        return f"no CPU kernels for {sys.platform}"
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return "this CPU lacks " + ", ".join(missing)
    return None


def build_key() -> str:
    """Hash of everything the compiled library depends on."""
    import torch

    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(COMPILE_FLAGS).encode())
    digest.update(torch.__version__.encode() + sys.version.encode())
    return digest.hexdigest()[:16]


def load_cpu_kernels() -> ModuleType | None:
    """The compiled kernel module, building it on first use; None (logged once) when unavailable."""
    reason = disabled_reason()
    if reason is not None and reason.startswith(ENV_SWITCH):
        return None  # a switch, not a fact about the machine: never remembered
    with _lock:
        if "cpu" in _loaded:
            return _loaded["cpu"]
        module: ModuleType | None = None
        if reason is None:
            try:
                module = _compile()
            except Exception as exc:  # a broken toolchain must degrade to the fallback, not crash
                reason = f"building them failed ({type(exc).__name__}: {str(exc).strip()[-400:]})"
        if module is None:
            log.warning("CPU kernels unavailable, using the pure-torch fallback: %s", reason)
        _loaded["cpu"] = module
        return module


def _compile() -> ModuleType:
    import torch
    from torch.utils.cpp_extension import load

    from lmserve.cache import cache_subdir

    key = build_key()
    name = f"lmserve_cpu_kernels_{key}"
    build_dir = cache_subdir("kernels") / f"cpu-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build_dir / "lock")
    if not (build_dir / f"{name}.so").exists():
        log.info("compiling CPU kernels, once (~30 s) into %s", build_dir)
    module = load(name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=list(COMPILE_FLAGS),
                  extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    log.debug("CPU kernels loaded from %s (torch %s)", build_dir, torch.__version__)
    return module


def _clear_stale_lock(lock: Path) -> None:
    """Wait for another process's compile to finish, but remove a lock older than any compile."""
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_S:
            log.warning("removing %s, left by an interrupted compile %.0f s ago", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(0.5)
