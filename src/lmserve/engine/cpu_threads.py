"""How many threads the CPU kernels use while other processes want the same cores.

Every kernel call is a parallel region that ends at a barrier: the step is as slow as its slowest
thread. When another process takes one of the cores (the frontend, a sidecar, a load generator, a
neighbour's job), the thread that shares that core runs only part of the time, and every barrier of
the step waits for it, several hundred times a step. Measured on a 2-core machine, one busy process
cut 16-stream output from 245 to 12 tokens/s. Two things make it a graceful slowdown instead:
threads that soon sleep at barriers rather than spin on (``quiet_thread_waits``: spinning threads
took the CPU their straggler needed), and no kernel thread on a core another process keeps busy (below).

``CpuThreadGovernor`` measures, once per interval, how much of the cores this process may use was
taken by *other* processes (all CPU time spent on those cores, less this process's own), and sets
the thread count to the cores left, with hysteresis so that a short burst of frontend work does not
make it flap: it steps down after ``down_after`` contended intervals in a row and back up after
``up_after`` free ones. The measurement and the thread setter are injected, so the policy is tested
with made-up readings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping

from lmserve.cpu_load import CpuReading, others_cores, read_cpu, usable_cores

log = logging.getLogger(__name__)

# A thread sharing its core with another process that always wants it gets half the core, and then
# N threads finish a region no sooner than N - 1 would; beside a process that wants the core only
# part of the time, the extra thread still pays. So a thread is dropped when other processes take
# more than this much of the core it would run on (in cores) ...
DROP_AT = 0.7
# ... and taken back when they take at most this much of it; in between the count holds.
TAKE_BACK_AT = 0.5


# Rounds an OpenMP thread spins at a barrier before it sleeps (libgomp's default: 300,000). Enough
# to bridge the gap between two kernels of one step (tens of microseconds of Python), not a step.
SPIN_ROUNDS = 20_000


def quiet_thread_waits(environ: MutableMapping[str, str]) -> None:
    """Make OpenMP threads spin only briefly at a barrier before they sleep, unless the operator chose
    (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set).

    libgomp's default spins for 300,000 rounds before sleeping: cheap on cores of one's own, but
    when another process shares a core, the spinning threads take the CPU the straggler they wait
    for needs. On a 2-core machine shared with other processes, a 16-request decode step took
    0.6-2.6 s with 2 threads spinning, 0.09-0.13 s with them sleeping. Sleeping at once
    (``OMP_WAIT_POLICY=PASSIVE``) costs a wake-up per kernel instead, several hundred a step: the
    server with no other load then gave 242 output tokens/s at 16 streams and 46 at one, against
    308 and 63 spinning ``SPIN_ROUNDS`` first, which still kept 81% of its speed beside a busy
    process (same 2-core machine, same run). Only effective before the OpenMP runtime starts
    (before torch is imported), so the engine process calls it first thing."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = str(SPIN_ROUNDS)


def threads_for(others: float, cores: int, current: int, max_threads: int) -> int:
    """The thread count the measurement asks for, before hysteresis.

    ``others`` is the CPU (in cores) that other processes used on our ``cores``. From ``current``
    threads we step down while other processes take more than ``DROP_AT`` of the last thread's
    core, and step up while they would take at most ``TAKE_BACK_AT`` of the next one's."""
    free = cores - max(0.0, others)
    target = current
    while target > 1 and free < target - DROP_AT:
        target -= 1
    while target < max_threads and free >= target + 1 - TAKE_BACK_AT:
        target += 1
    return target


class CpuThreadGovernor:
    """Adapts the kernels' thread count to the CPU other processes leave free; call ``after_step``
    once per engine step (cheap: it reads the counters only once per ``interval_s``)."""

    def __init__(self, max_threads: int, cores: int, read: Callable[[], CpuReading | None],
                 set_threads: Callable[[int], None], interval_s: float = 1.0,
                 down_after: int = 2, up_after: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        assert max_threads >= 1 and cores >= 1 and down_after >= 1 and up_after >= 1
        self.max_threads, self.cores = max_threads, cores
        self.read, self.set_threads, self.clock = read, set_threads, clock
        self.interval_s, self.down_after, self.up_after = interval_s, down_after, up_after
        self.threads = max_threads
        self.others = 0.0  # the last measurement, in cores
        self._last = read()
        self._streak = 0  # intervals in a row that asked for a change (negative: fewer threads)

    def after_step(self) -> None:
        if self._last is None or self.clock() - self._last.wall < self.interval_s:
            return
        now = self.read()
        if now is None or now.wall <= self._last.wall:
            return
        self.others = others_cores(self._last, now)
        self._last = now
        self._decide(threads_for(self.others, self.cores, self.threads, self.max_threads))

    def _decide(self, target: int) -> None:
        if target == self.threads:
            self._streak = 0
            return
        step = 1 if target > self.threads else -1
        self._streak = self._streak + step if self._streak * step >= 0 else step
        if abs(self._streak) < (self.up_after if step > 0 else self.down_after):
            return
        log.info("other processes use %.1f of %d core(s): %d -> %d kernel threads",
                 self.others, self.cores, self.threads, target)
        self.threads, self._streak = target, 0
        self.set_threads(target)


def cpu_thread_governor(max_threads: int) -> CpuThreadGovernor | None:
    """A governor over the real counters and torch's thread count, or None where it cannot measure
    (then the count stays fixed)."""
    import torch  # noqa: PLC0415 - keep this module importable without torch for its tests

    cores = usable_cores()
    if read_cpu(cores) is None:
        return None
    return CpuThreadGovernor(max(1, min(max_threads, len(cores))), len(cores), lambda: read_cpu(cores),
                             torch.set_num_threads)

