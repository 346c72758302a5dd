"""Placement: how many replicas, which GPUs or cores each gets, and how many threads per rank."""

from __future__ import annotations

import pytest

from lmserve.config.settings import EngineConfig
from lmserve.errors import ConfigError
from lmserve.workers.placement import Devices, detect_devices, is_oversubscribed, place, replica_count

CPU8 = Devices("cpu", 8, tuple(range(8)))
GPU4 = Devices("cuda", 4, tuple(range(16)), ("0", "1", "2", "3"))


@pytest.mark.parametrize(("devices", "degree", "low", "high", "expected"), [
    (CPU8, 1, None, None, 8),
    (CPU8, 2, None, None, 4),
    (CPU8, 3, None, None, 2),  # what is left over stays unused
    (CPU8, 1, None, 2, 2),  # maxWorkers caps
    (Devices("cpu", 1, (0, 1)), 2, None, None, 1),  # at least one
    (Devices("cpu", 1, (0, 1)), 1, 2, None, 2),  # minWorkers raises
    (GPU4, 2, None, None, 2),
])  # fmt: skip
def test_replica_count(devices: Devices, degree: int, low: int | None, high: int | None, expected: int) -> None:
    assert replica_count(devices, degree, low, high) == expected


def test_cpu_replicas_get_contiguous_cores_and_split_threads() -> None:
    two = [place(CPU8, 2, 2, i) for i in range(2)]
    assert [p.cpus for p in two] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [p.num_threads for p in two] == [2, 2]  # 4 cores per replica over 2 ranks
    assert two[0].env == {"OMP_NUM_THREADS": "2"} and two[0].describe()["cpus"] == [0, 1, 2, 3]
    one = place(Devices("cpu", 2, (0, 1)), 1, 1, 0)
    assert one.cpus == (0, 1) and one.num_threads == 2


def test_cpu_replicas_beyond_the_cores_share_them_up_to_cpu_devices() -> None:
    devices = Devices("cpu", 4, (0, 1))  # option.cpu_devices=4 on two cores
    shared = [place(devices, 1, 4, i) for i in range(4)]
    assert [p.cpus for p in shared] == [(0,), (1,), (0,), (1,)] and {p.num_threads for p in shared} == {1}
    assert is_oversubscribed(devices, 1, 4) and not is_oversubscribed(devices, 1, 2)
    with pytest.raises(ConfigError, match="at most 4 replica"):
        place(devices, 1, 5, 4)


def test_engine_config_takes_threads_and_a_memory_share_but_keeps_explicit_threads() -> None:
    placement = place(CPU8, 1, 4, 1)
    config = placement.engine_config(EngineConfig(model="m", kv_cache_memory_fraction=0.8))
    assert config.num_threads == 2 and config.kv_cache_memory_fraction == pytest.approx(0.2)
    assert placement.engine_config(EngineConfig(model="m", num_threads=3)).num_threads == 3


def test_cuda_replicas_get_blocks_of_gpus_through_the_environment() -> None:
    devices = Devices("cuda", 4, (0,), ("4", "5", "6", "7"))  # the parent itself sees GPUs 4-7
    blocks = [place(devices, 2, 2, i) for i in range(2)]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in blocks] == ["4,5", "6,7"]
    assert blocks[1].describe() == {"kind": "cuda", "gpus": ["6", "7"]}
    config = EngineConfig(model="m")
    assert blocks[0].engine_config(config) is config  # GPUs are not shared: nothing to divide
    with pytest.raises(ConfigError, match="at most 2 replica"):
        place(devices, 2, 3, 2)


def test_cpu_is_one_device_of_every_core_unless_configured() -> None:
    import os

    # One CPU device by default: a single replica on every core.
    assert detect_devices("cpu", None) == Devices("cpu", 1, tuple(sorted(os.sched_getaffinity(0))))
    assert detect_devices("cpu", 3).count == 3
