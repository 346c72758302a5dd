"""How busy the cores this process may use are: cumulative counters of this process's CPU time and
of every process's on those cores. Two readings say how much CPU *other* processes took in between,
which the engine's thread governor (``engine/cpu_threads.py``) and the kernel choice
(``kernels/choice.py``: a timing taken beside a busy process is not kept) both act on."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuReading:
    """Cumulative counters read at one moment, all in seconds."""

    wall: float  # a monotonic clock
    own_cpu: float  # CPU time of this process, all its threads
    busy_cpu: float  # CPU time of every process on the cores this process may use (steal included)


def read_cpu(cores: Sequence[int]) -> CpuReading | None:
    """This process's CPU time and every process's busy time on ``cores``; None where the system
    does not say."""
    import psutil  # noqa: PLC0415 - imported where it is used

    try:
        per_cpu = psutil.cpu_times(percpu=True)
        own = psutil.Process().cpu_times()
    except (OSError, psutil.Error):
        return None
    busy = 0.0
    for i in cores:
        if i >= len(per_cpu):
            return None
        t = per_cpu[i]
        busy += t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) \
            + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)
    return CpuReading(time.monotonic(), own.user + own.system, busy)


def usable_cores() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def others_cores(before: CpuReading, after: CpuReading) -> float:
    """The CPU (in cores, averaged over the interval) that other processes took between two readings."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, (after.busy_cpu - before.busy_cpu) - (after.own_cpu - before.own_cpu)) / wall


def tick_error(cores: int, wall: float) -> float:
    """How far ``others_cores`` over ``wall`` seconds may be off, in cores: the system counts CPU
    time in whole clock ticks (1/100 s on Linux), so each core's counter and this process's may each
    be off by a tick. Over a few milliseconds that is several cores."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (cores + 1) / (ticks * wall) if wall > 0 else float("inf")


class OthersWatch:
    """A ``with`` block's share of other processes: ``others`` is the CPU (in cores, averaged over
    the block) they took on this process's cores, and ``error`` how far that may be off
    (``tick_error``: a block of a few milliseconds says next to nothing); both 0 where the system
    does not say, as a second look could not say more."""

    def __init__(self) -> None:
        self.cores = usable_cores()
        self.others = 0.0
        self.error = 0.0
        self._before: CpuReading | None = None

    def __enter__(self) -> OthersWatch:
        self._before = read_cpu(self.cores)
        return self

    def __exit__(self, *exc: object) -> None:
        after = read_cpu(self.cores)
        if self._before is not None and after is not None:
            self.others = others_cores(self._before, after)
            self.error = tick_error(len(self.cores), after.wall - self._before.wall)
