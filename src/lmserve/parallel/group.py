"""Joining a tensor-parallel process group: rendezvous, backend, device per rank, degree checks.

Ranks meet through the environment, as ``torchrun`` and most cluster launchers set it up:
``MASTER_ADDR``/``MASTER_PORT`` name rank 0's rendezvous store, ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
say who this process is. A group may therefore span hosts. Model collectives run on the default
group (NCCL on CUDA, gloo on the CPU); step messages and host-side bookkeeping use a second, gloo
"control" group, so they never touch device memory.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from lmserve.errors import ConfigError
from lmserve.parallel.state import ParallelState

COLLECTIVE_TIMEOUT_S = 60.0  # a peer silent this long inside a collective counts as dead
STORE_TIMEOUT_S = 300.0  # the rendezvous waits this long for every rank to arrive


@dataclass(frozen=True)
class GroupSpec:
    """Who this process is in its group and where the group meets."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    local_rank: int | None = None  # index of this rank's device on its host; None = ``rank``

    @property
    def device_index(self) -> int:
        return self.rank if self.local_rank is None else self.local_rank

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GroupSpec:
        """Read ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` (and ``LOCAL_RANK``)."""
        env = os.environ if environ is None else environ
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if not env.get(k)]
        if missing:
            raise ConfigError(missing[0], None, "set by the launcher of a tensor-parallel rank "
                                               f"(missing: {', '.join(missing)})", source="environment")
        local = env.get("LOCAL_RANK")
        spec = cls(rank=_env_int(env, "RANK"), world_size=_env_int(env, "WORLD_SIZE"),
                   master_addr=env["MASTER_ADDR"], master_port=_env_int(env, "MASTER_PORT"),
                   local_rank=None if local is None else _env_int(env, "LOCAL_RANK"))
        if not 0 <= spec.rank < spec.world_size:
            raise ConfigError("RANK", spec.rank, f"0 to {spec.world_size - 1} (WORLD_SIZE is {spec.world_size})",
                              source="environment")
        return spec

    def env(self) -> dict[str, str]:
        """The environment variables that describe this rank (what ``from_env`` reads)."""
        env = {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "RANK": str(self.rank),
               "WORLD_SIZE": str(self.world_size)}
        if self.local_rank is not None:
            env["LOCAL_RANK"] = str(self.local_rank)
        return env


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(key, env[key], "an integer", source="environment") from None


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for groups on one host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def backend_for(device_type: str) -> str:
    """NCCL between CUDA devices, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def device_for_rank(device_type: str, local_rank: int) -> torch.device:
    """The device a rank computes on: ``cuda:<local_rank>`` (made current), or the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def threads_per_rank(degree: int, cores: int | None = None) -> int:
    """CPU threads each rank may use so that ``degree`` ranks on one host share its cores."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // degree)


def check_degree(degree: int, num_heads: int, device_type: str, device_count: int | None = None) -> None:
    """Refuse, before anything starts, a degree that cannot work; the message names the numbers."""
    if degree < 1:
        raise ConfigError("tensor_parallel_degree", degree, "an integer of at least 1")
    if degree > num_heads:
        raise ConfigError("tensor_parallel_degree", degree,
                          f"at most {num_heads}: the model has {num_heads} query heads and every rank needs one")
    if device_type == "cuda":
        count = torch.cuda.device_count() if device_count is None else device_count
        if degree > count:
            raise ConfigError("tensor_parallel_degree", degree,
                              f"at most {count}: one rank per CUDA device and {count} are visible")


def open_store(spec: GroupSpec, timeout_s: float = STORE_TIMEOUT_S) -> Any:
    """The rendezvous store: rank 0 serves it (on an ephemeral port when ``master_port`` is 0)."""
    import torch.distributed as dist

    return dist.TCPStore(spec.master_addr, spec.master_port, spec.world_size, is_master=spec.rank == 0,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


@dataclass
class ProcessGroup:
    """This process's membership: ``state`` for model collectives, ``control`` (gloo) for messages."""

    spec: GroupSpec
    state: ParallelState
    control: Any
    store: Any
    device: torch.device

    def close(self) -> None:
        """Leave the group (collective timeouts aside, peers see this as the end of the group)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def join_group(spec: GroupSpec, device_type: str, store: Any = None,
               timeout_s: float = COLLECTIVE_TIMEOUT_S) -> ProcessGroup:
    """Initialise ``torch.distributed`` for this rank; returns once every rank has joined."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a process group; one tensor-parallel "
                           "group per process (shut the previous engine down first)")
    device = device_for_rank(device_type, spec.device_index)
    store = store if store is not None else open_store(spec)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend_for(device_type), store=store, rank=spec.rank,
                            world_size=spec.world_size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    state = ParallelState(spec.rank, spec.world_size, dist.group.WORLD)
    return ProcessGroup(spec, state, control, store, device)
