"""The CPU thread governor's decisions, from made-up CPU counters (nothing here is timed)."""

from __future__ import annotations

import pytest

from lmserve.engine.cpu_threads import (
    CpuReading,
    CpuThreadGovernor,
    quiet_thread_waits,
    read_cpu,
    threads_for,
    usable_cores,
)


class FakeCpu:
    """Cumulative counters of a machine with ``cores`` cores on which this process and others run."""

    def __init__(self) -> None:
        self.wall = self.own = self.busy = 0.0

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.wall += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds

    def read(self) -> CpuReading:
        return CpuReading(self.wall, self.own, self.busy)


def make_governor(cpu: FakeCpu, max_threads: int = 2, cores: int = 2) -> tuple[CpuThreadGovernor, list[int]]:
    calls: list[int] = []
    governor = CpuThreadGovernor(max_threads, cores, cpu.read, calls.append, interval_s=1.0, down_after=2,
                                 up_after=3, clock=lambda: cpu.wall)  # fmt: skip
    return governor, calls


def seconds_of(governor: CpuThreadGovernor, cpu: FakeCpu, seconds: int, own: float, others: float) -> None:
    """``seconds`` one-second intervals with a step at the end of each."""
    for _ in range(seconds):
        cpu.run(1.0, own, others)
        governor.after_step()


def test_a_busy_process_on_one_of_two_cores_drops_a_thread_after_two_intervals():
    cpu = FakeCpu()
    governor, calls = make_governor(cpu)
    seconds_of(governor, cpu, 5, own=1.9, others=0.1)  # the frontend's share: no change
    assert calls == [] and governor.threads == 2
    seconds_of(governor, cpu, 1, own=1.1, others=0.9)
    assert calls == []  # one contended interval is not enough
    seconds_of(governor, cpu, 1, own=1.1, others=0.9)
    assert calls == [1] and governor.threads == 1
    seconds_of(governor, cpu, 10, own=1.0, others=1.0)  # it stays down while the process runs
    assert calls == [1]


def test_threads_come_back_after_three_free_intervals():
    cpu = FakeCpu()
    governor, calls = make_governor(cpu)
    seconds_of(governor, cpu, 2, own=1.0, others=1.0)
    assert calls == [1]
    seconds_of(governor, cpu, 2, own=1.0, others=0.1)
    assert calls == [1]
    seconds_of(governor, cpu, 1, own=1.0, others=0.1)
    assert calls == [1, 2] and governor.threads == 2


def test_alternating_load_does_not_make_the_count_flap():
    cpu = FakeCpu()
    governor, calls = make_governor(cpu)
    for _ in range(10):  # contended and free in turn: no streak is long enough either way
        seconds_of(governor, cpu, 1, own=1.0, others=1.0)
        seconds_of(governor, cpu, 1, own=1.9, others=0.1)
    assert calls == []


def test_readings_are_taken_once_per_interval_not_every_step():
    cpu, reads = FakeCpu(), []

    def read() -> CpuReading:
        reads.append(cpu.wall)
        return cpu.read()

    governor = CpuThreadGovernor(2, 2, read, lambda n: None, interval_s=1.0, clock=lambda: cpu.wall)
    for _ in range(80):  # 80 steps of 1/16 s (exact in binary, so the count does not hinge on rounding)
        cpu.run(1 / 16, 2.0, 0.0)
        governor.after_step()
    assert len(reads) == 1 + 5  # the first reading, then one per second


@pytest.mark.parametrize(("others", "current", "expected"), [
    (0.0, 2, 2), (0.6, 2, 2), (0.8, 2, 1), (1.0, 2, 1),  # stepping down when most of a core is taken
    (0.6, 1, 1), (0.4, 1, 2),  # stepping up when half a core is free: in between the count holds
    (3.8, 8, 4), (0.0, 4, 8), (9.0, 8, 1),  # larger machines move by more than one; never below one
])  # fmt: skip
def test_threads_for_the_cores_other_processes_leave(others, current, expected):
    cores = 8 if current > 2 or others > 2 else 2
    assert threads_for(others, cores, current, max_threads=cores) == expected


def test_never_more_threads_than_configured():
    assert threads_for(0.0, cores=8, current=2, max_threads=2) == 2


def test_no_readings_means_no_changes():
    calls: list[int] = []
    governor = CpuThreadGovernor(2, 2, lambda: None, calls.append, clock=lambda: 1e9)
    governor.after_step()
    assert calls == [] and governor.threads == 2


def test_real_counters_are_readable_here():
    reading = read_cpu(usable_cores())
    assert reading is not None and reading.busy_cpu >= 0 and reading.own_cpu > 0


def test_openmp_threads_soon_sleep_at_barriers_unless_the_operator_chose():
    env: dict[str, str] = {}
    quiet_thread_waits(env)
    assert env == {"GOMP_SPINCOUNT": "20000"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(chosen)
        quiet_thread_waits(env)
        assert env == chosen
