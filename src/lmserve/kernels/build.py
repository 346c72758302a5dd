"""Compiling the CPU kernels once per machine type, proving they run here, and loading them.

There are two builds: AVX-512 (every kernel) and AVX2 + FMA (the linear layers, with bf16 weights
and the weight-only quantized layouts, attention, RMS norm, rotary embedding and cache writes; the
other ops fall back to pure torch). Each is built with explicit instruction-set flags, never
``-march=native``: some CPUs report features (AMX) whose instructions fault under virtualization,
and the build cache must not depend on the machine that happened to compile first. A CPU's flags are not trusted alone either: before the server
process loads a build, a child process compiles it, loads it and runs a tiny product (:func:`probe`);
a child killed by a signal (an illegal instruction) marks that build unusable on this machine,
remembered under the machine's key. Builds are cached under
``cache_subdir("kernels")``, keyed by the sources, the flags and the torch version, one directory per
install location (:func:`build_dir_name`), and always run by the environment's own ninja
(:func:`own_ninja`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from filelock import Timeout

from lmserve.environ import env_set
from lmserve.errors import ConfigError
from lmserve.fsutil import file_lock
from lmserve.kernels.machine import cpu_flags, is_x86, machine_key, probe_verdict

log = logging.getLogger(__name__)

ENV_SWITCH = "LMSERVE_CPU_KERNELS"
ISA_ENV = "LMSERVE_CPU_ISA"  # auto (the best build that runs here), avx512 or avx2
CSRC = Path(__file__).with_name("csrc")
# Sources compiled into the AVX-512 extension; headers only feed the cache key.
SOURCES = ("bindings.cpp", "gemm.cpp", "attention.cpp", "elementwise.cpp", "kv_cache.cpp",
           "quant_gemm.cpp", "encoder_attention.cpp", "pack.cpp")
AVX2_SOURCES = ("bindings.cpp", "gemm_avx2.cpp", "quant_gemm_avx2.cpp", "attention_avx2.cpp", "elementwise_avx2.cpp",
                "pack.cpp")
_COMMON_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno")

PROBE_TIMEOUT_S = 1200.0  # the probe compiles on a fresh machine
BUILD_WAIT_S = 1200.0  # longest wait for another process's compile before using the torch fallback


@dataclass(frozen=True)
class Isa:
    """One build of the kernels: what the CPU must report, how to compile, what it covers."""

    name: str
    required_flags: tuple[str, ...]
    compile_flags: tuple[str, ...]
    sources: tuple[str, ...]
    gemm_only: bool  # no argmax, SwiGLU, encoder attention or bf16 dot products: those run in torch


ISAS = {
    "avx512": Isa("avx512", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
                  ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", *_COMMON_FLAGS),
                  SOURCES, gemm_only=False),
    "avx2": Isa("avx2", ("avx2", "fma"), ("-mavx2", "-mfma", "-DLMSERVE_GEMM_ONLY", *_COMMON_FLAGS),
                AVX2_SOURCES, gemm_only=True),
}
PREFERENCE = ("avx512", "avx2")  # best first

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def requested_isa() -> str:
    """``LMSERVE_CPU_ISA``: ``auto`` (default) or the name of one build to use (or none at all)."""
    value = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if value != "auto" and value not in ISAS:
        raise ConfigError(ISA_ENV, value, "auto, " + ", ".join(ISAS), source="environment")
    return value


def isa_unavailable(isa: Isa) -> str | None:
    """Why ``isa``'s build cannot run on this CPU by its reported flags, or None."""
    if sys.platform != "linux":
        return f"no CPU kernels for {sys.platform}"
    if not is_x86():
        return "the CPU kernels are x86 only"
    missing = [flag for flag in isa.required_flags if flag not in cpu_flags()]
    return f"this CPU lacks {', '.join(missing)} ({isa.name})" if missing else None


def candidate_isas() -> list[Isa]:
    """The builds to try, best first: the one ``LMSERVE_CPU_ISA`` names, or all by preference."""
    wanted = requested_isa()
    return [ISAS[wanted]] if wanted != "auto" else [ISAS[name] for name in PREFERENCE]


def disabled_reason() -> str | None:
    """Why no compiled kernels can be used here (by switch, platform or CPU flags), or None when at
    least one build may run (the child-process probe still has the last word)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_SWITCH}=0"
    reasons = [isa_unavailable(isa) for isa in candidate_isas()]
    if any(reason is None for reason in reasons):
        return None
    return "; ".join(r for r in reasons if r)


def build_key(isa: Isa | None = None) -> str:
    """Hash of everything the compiled library of ``isa`` (default AVX-512) depends on."""
    import torch

    isa = isa or ISAS["avx512"]
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(isa.compile_flags + isa.sources).encode())
    digest.update(torch.__version__.encode() + sys.version.encode())
    return digest.hexdigest()[:16]


def build_dir_name(isa: Isa, key: str, csrc: Path = CSRC) -> str:
    """The build directory of ``isa``'s kernels with build key ``key`` from sources at ``csrc``.

    Installs at two places (two virtual environments, a checkout and a wheel) share one cache, and
    torch's builder records the sources' paths: sharing one directory, each would find the other's
    build stale and compile again (~30 s) on every switch. So the place is part of the name, as a
    hash; the build key, which the kernel-choice and probe caches use, stays the sources' content."""
    where = hashlib.sha256(str(csrc.resolve()).encode()).hexdigest()[:8]
    return f"cpu-{isa.name}-{key}-{where}"


def load_cpu_kernels() -> ModuleType | None:
    """The best compiled kernel module that runs here (its ``lmserve_isa`` names the build), built
    and probed on first use; None (logged once) when none is available."""
    reason = disabled_reason()
    if reason is not None and reason.startswith(ENV_SWITCH):
        return None  # a switch, not a fact about the machine: never remembered
    wanted = requested_isa()
    with _lock:
        if wanted in _loaded:
            return _loaded[wanted]
        module: ModuleType | None = None
        reasons = [reason] if reason else []
        for isa in [] if reason else candidate_isas():
            why = isa_unavailable(isa) or probe(isa)
            if why is None:
                try:
                    module = _compile(isa)
                    break
                except Exception as exc:  # a broken toolchain must degrade to the fallback, not crash
                    why = f"building them failed ({type(exc).__name__}: {str(exc).strip()[-400:]})"
            reasons.append(why)
        if module is None:
            log.warning("CPU kernels unavailable, using the pure-torch fallback: %s", "; ".join(reasons))
        _loaded[wanted] = module
        return module


def probe(isa: Isa) -> str | None:
    """Build and try ``isa``'s kernels in a child process: None when they ran and gave the right
    answer, else why not (``machine.probe_verdict``: a crash is remembered for this machine)."""
    key = machine_key(build=build_key(isa), isa=isa.name)
    return probe_verdict(isa.name, key, _probe_command(isa), PROBE_TIMEOUT_S)


def _probe_command(isa: Isa) -> list[str]:
    return [sys.executable, "-c", f"from lmserve.kernels.build import probe_main; probe_main({isa.name!r})"]


def probe_main(name: str) -> None:
    """The child side of :func:`probe`: build, load and run one small product; exit 0 when right."""
    import torch

    from lmserve.kernels.packed import pack_panels

    ext = _compile(ISAS[name])
    torch.manual_seed(0)
    w, x = torch.randn(40, 70).bfloat16(), torch.randn(5, 70)
    got = ext.linear(x, pack_panels(w), 40, None, 0, 1)
    want = x.double() @ w.double().T
    sys.exit(0 if torch.allclose(got.double(), want, rtol=1e-4, atol=1e-3) else 1)


def _compile(isa: Isa) -> ModuleType:
    import torch
    from torch.utils.cpp_extension import load

    from lmserve.cache import cache_subdir

    key = build_key(isa)
    name = f"lmserve_cpu_kernels_{isa.name}_{key}"
    build_dir = cache_subdir("kernels") / build_dir_name(isa, key)
    build_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(build_dir), own_ninja():
        if not (build_dir / f"{name}.so").exists():
            log.info("compiling the %s CPU kernels, once (~30 s) into %s", isa.name, build_dir)
        module = load(name=name, sources=[str(CSRC / s) for s in isa.sources],
                      extra_cflags=list(isa.compile_flags), extra_ldflags=["-fopenmp"],
                      build_directory=str(build_dir), verbose=False)
    module.lmserve_isa = isa.name  # type: ignore[attr-defined]
    log.debug("%s CPU kernels loaded from %s (torch %s)", isa.name, build_dir, torch.__version__)
    return module


def ninja_binary() -> Path | None:
    """The binary of the ``ninja`` package (a dependency), or None without one. Found through the
    package's record of its files, not the running interpreter's scripts directory (the package's
    own ``BIN_DIR``): a model's own virtual environment (``option.enable_venv``) runs on top of
    lmserve's packages with an interpreter whose directory has no ninja."""
    try:
        dist = importlib.metadata.distribution("ninja")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "ninja" and file.parent.name == "bin":
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


@contextlib.contextmanager
def own_ninja() -> Iterator[None]:
    """Put this environment's ninja first on PATH meanwhile: torch's builder runs the first ``ninja``
    on PATH, which may be missing (then no kernels at all) or another version. ninja versions hash a
    build's commands differently, so a build made by one looks stale to the other: in a clean clone
    on a machine with its own ninja, processes started with and without the environment's ``bin``
    on PATH (a container entry point, a server started from Python, a model's own virtual
    environment) compiled everything again (~50 s each) at every switch, up to six times in one run
    of the test suite."""
    binary = ninja_binary()
    if binary is None:
        yield
        return
    with env_set("PATH", os.pathsep.join([str(binary.parent), *filter(None, [os.environ.get("PATH")])])):
        yield


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold ``build_dir``'s compile lock: one process compiles (or loads) a build at a time.

    It is an OS lock, released when its holder dies, so a compile that was killed stalls nobody.
    torch's builder keeps a lock file of its own, which a killed compile leaves behind and which
    torch then waits on forever; every compile here runs under this lock, so whoever holds it
    knows such a file is stale and removes it."""
    lock = file_lock(build_dir / "build.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is compiling the CPU kernels into %s; waiting for it", build_dir)
        try:
            lock.acquire(timeout=BUILD_WAIT_S)
        except Timeout:
            raise TimeoutError(f"another process held the kernel build lock for over {BUILD_WAIT_S:.0f} s"
                               f" ({build_dir / 'build.lock'})") from None
    try:
        torch_lock = build_dir / "lock"
        if torch_lock.exists():
            log.warning("removing %s, left by an interrupted compile", torch_lock)
            torch_lock.unlink(missing_ok=True)
        yield
    finally:
        lock.release()
