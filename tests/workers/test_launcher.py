"""The launcher over real spawned fake-engine processes: placement, restarts, retry threshold, scaling."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from lmserve.config.settings import WorkerConfig
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import EngineDeadError
from lmserve.workers.launcher import Backoff, Launcher
from lmserve.workers.placement import Devices, usable_cores
from lmserve.workers.replica_state import ReplicaState

pytestmark = pytest.mark.anyio
FAST = Backoff(first_s=0.05, max_s=0.2)
CORES = usable_cores()


def make_launcher(spec, devices: int = 2, failed: list[BaseException] | None = None,
                  **workers: object) -> Launcher:  # type: ignore[no-untyped-def]
    config = WorkerConfig(**{"job_queue_size": 8, "model_loading_timeout_s": 30.0} | workers)  # type: ignore[arg-type]
    on_failed = failed.append if failed is not None else None
    return Launcher("tiny", spec, Devices("cpu", devices, CORES), config, FAST, on_failed)


async def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores")
async def test_replicas_are_pinned_to_their_cores_and_share_the_load(fake_spec) -> None:
    launcher = make_launcher(fake_spec())
    try:
        await launcher.start(2)
        first, second = launcher.replicas
        half = len(CORES) // 2
        assert os.sched_getaffinity(first.pid) == set(CORES[:half])  # type: ignore[arg-type]
        assert os.sched_getaffinity(second.pid) == set(CORES[half: 2 * half])  # type: ignore[arg-type]
        streams = [launcher.router.submit([5, 6], SamplingParams(max_new_tokens=2), f"r{i}") for i in range(4)]
        for stream in streams:
            assert [d async for d in stream][-1].finish_reason == "length"
        assert first.requests_total == 2 and second.requests_total == 2  # ties go round-robin
    finally:
        await launcher.stop()


async def test_each_replica_process_gets_its_gpus_through_its_environment(fake_spec) -> None:
    devices = Devices("cuda", 4, CORES, ("4", "5", "6", "7"))  # as if this process saw GPUs 4-7
    spec = fake_spec(device_from_env="CUDA_VISIBLE_DEVICES")
    spec = replace(spec, config=replace(spec.config, tensor_parallel_degree=2))
    launcher = Launcher("tiny", spec, devices, WorkerConfig(model_loading_timeout_s=30.0), FAST)
    try:
        await launcher.start(2)
        assert [r.model_info.device for r in launcher.replicas] == ["4,5", "6,7"]  # type: ignore[union-attr]
    finally:
        await launcher.stop()


async def test_a_dead_replica_fails_its_requests_at_once_and_restarts(fake_spec) -> None:
    launcher = make_launcher(fake_spec(token_delay_s=0.02), retry_threshold=3)
    try:
        await launcher.start(2)
        victim, other = launcher.replicas
        old_pid = victim.pid
        stream = victim.submit([5, 6], SamplingParams(max_new_tokens=50), "long")
        await stream.__anext__()
        killed = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)  # type: ignore[arg-type]
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            async for _ in stream:
                pass
        assert time.monotonic() - killed < 3
        assert victim.state in (ReplicaState.RESTARTING, ReplicaState.LOADING)
        served = launcher.router.submit([5], SamplingParams(max_new_tokens=1), "meanwhile")
        assert [d async for d in served][-1].finished and other.requests_total == 1
        await wait_until(lambda: victim.state is ReplicaState.READY)
        assert victim.pid != old_pid and victim.restarts == 1 and victim.consecutive_failures == 0
    finally:
        await launcher.stop()


async def test_restarts_failing_past_retry_threshold_fail_the_model(fake_spec, tmp_path: Path) -> None:
    marker = tmp_path / "fail-from-now-on"
    failed: list[BaseException] = []
    launcher = make_launcher(fake_spec(fail_load_if_exists=str(marker)), devices=1, failed=failed, retry_threshold=2)
    try:
        await launcher.start(1)
        [replica] = launcher.replicas
        marker.touch()
        os.kill(replica.pid, signal.SIGKILL)  # type: ignore[arg-type]
        await wait_until(lambda: bool(failed))
        assert replica.state is ReplicaState.FAILED and replica.consecutive_failures == 2 and replica.restarts == 2
        assert "retry_threshold 2" in str(failed[0]) and "fail while loading" in str(failed[0])
    finally:
        await launcher.stop()


async def test_retry_threshold_zero_gives_up_at_the_first_death(fake_spec) -> None:
    failed: list[BaseException] = []
    launcher = make_launcher(fake_spec(), devices=1, failed=failed, retry_threshold=0)
    try:
        await launcher.start(1)
        os.kill(launcher.replicas[0].pid, signal.SIGKILL)  # type: ignore[arg-type]
        await wait_until(lambda: bool(failed))
        assert launcher.replicas[0].restarts == 0
    finally:
        await launcher.stop()


async def test_scale_up_then_down_drains_and_aborts_only_the_removed_replica(fake_spec) -> None:
    launcher = make_launcher(fake_spec(token_delay_s=0.02))
    try:
        await launcher.start(1)
        await launcher.scale(2, drain_timeout=0.0)
        kept, removed = launcher.replicas
        assert removed.state is ReplicaState.READY and len(launcher.router.ready_replicas()) == 2
        short = kept.submit([5], SamplingParams(max_new_tokens=30), "short")
        long = removed.submit([5], SamplingParams(max_new_tokens=200), "long")
        removed_pid = removed.pid
        await launcher.scale(1, drain_timeout=0.3)
        assert launcher.replicas == [kept] and removed.state is ReplicaState.STOPPED
        with pytest.raises(EngineDeadError, match="scale-down"):
            async for _ in long:
                pass
        assert [d async for d in short][-1].finish_reason == "length"  # the kept replica is untouched
        assert gone(removed_pid)  # type: ignore[arg-type]
    finally:
        await launcher.stop()


@pytest.mark.parametrize("parallel", [False, True])
async def test_a_failed_start_stops_every_replica(fake_spec, parallel: bool) -> None:
    launcher = make_launcher(fake_spec(fail_load=True), parallel_loading=parallel)
    with pytest.raises(RuntimeError, match="fail while loading"):
        await launcher.start(2)
    assert {r.state for r in launcher.replicas} == {ReplicaState.STOPPED}


async def test_parallel_loading_starts_replicas_together(fake_spec) -> None:
    launcher = make_launcher(fake_spec(load_delay_s=2.0), parallel_loading=True)
    try:
        started = time.monotonic()
        await launcher.start(2)
        assert time.monotonic() - started < 3.8  # one after another takes more than 4 s
    finally:
        await launcher.stop()
