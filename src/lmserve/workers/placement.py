"""Where each replica of a model runs: the devices it owns, its CPU cores and threads.

A model runs as ``replicas`` engine groups of ``tensor_parallel_degree`` ranks each, where
``replicas = devices // degree``, capped by ``maxWorkers`` and raised to ``minWorkers`` (the
device's own ``gpu.*``/``cpu.*`` bounds first). ``tensor_parallel_degree=max`` is resolved here,
before placement (``resolve_degree``): all visible GPUs on CUDA, 1 on the CPU.

- **CUDA**: replica ``i`` owns the contiguous block of GPUs ``[i*d, (i+1)*d)`` of those this process
  sees; its engine process gets them through ``CUDA_VISIBLE_DEVICES``, so its ranks count from 0.
  More replicas than the GPUs hold is a configuration error.
- **CPU**: the "devices" are ``option.cpu_devices`` (default 1: one replica using every core, which
  gives the largest batches and the fastest single stream; set it to split the cores). The
  cores are split into contiguous blocks, one per replica; the engine process pins itself to its
  block (``sched_setaffinity``, inherited by its tensor-parallel ranks) and each rank runs
  ``cores_per_replica // degree`` threads, so that replicas x ranks x threads never exceeds the
  cores. ``option.cpu_devices`` above the core count allows more replicas than cores: they share
  cores, one thread per rank (logged as oversubscribed); more replicas than
  ``max(cores, cpu_devices)`` is refused.
  Replicas on one host share its memory, so each one's KV-cache memory share is divided by the
  number of replicas.

Nothing here imports torch: the frontend counts GPUs by asking a short-lived child interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from lmserve import cpu_load
from lmserve.config.settings import EngineConfig
from lmserve.config.values import TENSOR_PARALLEL_MAX
from lmserve.errors import ConfigError

logger = logging.getLogger("lmserve.workers")
_PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Devices:
    """What replicas can be placed on: the device kind, how many devices, and the host's cores."""

    kind: Literal["cpu", "cuda"]
    count: int  # CPU "devices" (option.cpu_devices) or visible GPUs
    cores: tuple[int, ...]  # the CPU cores this process may run on
    gpu_ids: tuple[str, ...] = ()  # the visible GPUs, named as CUDA_VISIBLE_DEVICES names them


@dataclass(frozen=True)
class Placement:
    """Where one replica runs. ``cpus`` None means not pinned; ``num_threads`` is per rank."""

    index: int
    kind: Literal["cpu", "cuda"]
    gpus: tuple[str, ...] = ()
    cpus: tuple[int, ...] | None = None
    num_threads: int | None = None
    memory_share: float = 1.0  # share of host memory this replica's KV cache may plan for (CPU)
    env: dict[str, str] = field(default_factory=dict)

    def engine_config(self, config: EngineConfig) -> EngineConfig:
        """``config`` adjusted to this placement: threads per rank and KV-cache memory share on the
        CPU (an explicit ``option.num_threads`` is kept)."""
        if self.kind != "cpu":
            return config
        return dataclasses.replace(config, num_threads=config.num_threads or self.num_threads,
                                   kv_cache_memory_fraction=config.kv_cache_memory_fraction * self.memory_share)  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The placement as the management API shows it."""
        if self.kind == "cuda":
            return {"kind": "cuda", "gpus": list(self.gpus)}
        return {"kind": "cpu", "cpus": list(self.cpus) if self.cpus is not None else None,
                "threads_per_rank": self.num_threads}  # fmt: skip


def resolve_degree(devices: Devices, degree: int) -> int:
    """``degree``, with ``option.tensor_parallel_degree=max`` (``TENSOR_PARALLEL_MAX``) resolved:
    every visible GPU on CUDA; 1 on the CPU, where ranks would split the same cores and memory
    bandwidth among themselves and add an all-reduce per layer, so one rank on all the cores is
    the fastest use of them (``option.cpu_devices`` is how to run several replicas instead)."""
    if degree != TENSOR_PARALLEL_MAX:
        return degree
    if devices.kind == "cuda":
        if not devices.gpu_ids:
            raise ConfigError("option.tensor_parallel_degree", "max", "a number when no GPU is visible "
                              "(option.device=cuda found none)")  # fmt: skip
        return len(devices.gpu_ids)
    return 1


def replica_count(devices: Devices, degree: int, min_workers: int | None, max_workers: int | None) -> int:
    """``devices // degree`` (at least one), capped by ``max_workers``, raised to ``min_workers``."""
    count = max(1, devices.count // max(1, degree))
    if max_workers is not None:
        count = min(count, max_workers)
    if min_workers is not None:
        count = max(count, min_workers)
    return count


def place(devices: Devices, degree: int, replicas: int, index: int) -> Placement:
    """Replica ``index``'s share when the model runs ``replicas`` replicas at ``degree``."""
    if devices.kind == "cuda":
        return _place_cuda(devices, degree, replicas, index)
    cores = devices.cores
    most = max(len(cores), devices.count)
    if replicas > most:
        raise ConfigError("maxWorkers", replicas, f"at most {most} replica(s) on {len(cores)} core(s) with "
                          f"option.cpu_devices {devices.count}")  # fmt: skip
    per_replica = len(cores) // replicas
    if per_replica >= 1:
        cpus = cores[index * per_replica: (index + 1) * per_replica]
        threads = max(1, per_replica // degree)
    else:  # more replicas than cores: they share, one thread per rank
        cpus, threads = (cores[index % len(cores)],), 1
    return Placement(index, "cpu", cpus=cpus, num_threads=threads, memory_share=1.0 / replicas,
                     env={"OMP_NUM_THREADS": str(threads)})  # fmt: skip


def _place_cuda(devices: Devices, degree: int, replicas: int, index: int) -> Placement:
    fits = len(devices.gpu_ids) // degree
    if replicas > fits:
        raise ConfigError("maxWorkers", replicas, f"at most {fits} replica(s): {len(devices.gpu_ids)} visible "
                          f"GPU(s) at tensor_parallel_degree {degree}")  # fmt: skip
    gpus = devices.gpu_ids[index * degree: (index + 1) * degree]
    return Placement(index, "cuda", gpus=gpus, env={"CUDA_VISIBLE_DEVICES": ",".join(gpus)})


def is_oversubscribed(devices: Devices, degree: int, replicas: int) -> bool:
    """True when ``replicas`` CPU replicas at ``degree`` need more threads than there are cores."""
    return devices.kind == "cpu" and replicas * degree > len(devices.cores)


def detect_devices(device: str, cpu_devices: int | None) -> Devices:
    """The devices for ``option.device`` (auto, cpu, cuda): visible GPUs unless the device is
    ``cpu`` or none are visible, else ``cpu_devices`` CPU devices (default 1, all cores in one)."""
    cores = usable_cores()
    if device != "cpu":
        gpus = visible_gpus()
        if gpus or device == "cuda":
            return Devices("cuda", len(gpus), cores, gpus)
    return Devices("cpu", cpu_devices or 1, cores)


def usable_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return tuple(cpu_load.usable_cores())


@functools.cache
def visible_gpus() -> tuple[str, ...]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices when
    it is unset). Without an NVIDIA driver the answer is empty at once; with one, a child
    interpreter counts them with torch, which this process must not import."""
    if not os.path.exists("/proc/driver/nvidia") and not glob.glob("/dev/nvidia[0-9]*"):
        return ()
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=_PROBE_TIMEOUT_S, check=True)  # fmt: skip
        count = int(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
        logger.warning("could not count CUDA devices (%s); placing replicas on the CPU", exc)
        return ()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in visible.split(",")] if visible is not None else [str(i) for i in range(count)]
    return tuple(names[:count])
