"""Router: least-loaded replica, bounded per replica, clear errors when none can take a request."""

from __future__ import annotations

import pytest

from lmserve.engine.protocol import EngineStats
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import CapacityError, EngineDeadError
from lmserve.workers.replica_state import ReplicaState
from lmserve.workers.router import Router


class StubReplica:
    """Stands in for an EngineClient: counts what it was given."""

    def __init__(self, outstanding: int, state: ReplicaState = ReplicaState.READY) -> None:
        self.outstanding, self.state, self.error = outstanding, state, None
        self.submitted: list[str] = []

    def submit(self, prompt, params, request_id, deadline=None):  # type: ignore[no-untyped-def]
        self.submitted.append(request_id)
        self.outstanding += 1
        return request_id

    async def stats(self, timeout: float = 5.0) -> EngineStats:
        return EngineStats(num_running=self.outstanding, kv_blocks_total=10, kv_blocks_free=4)


def test_picks_the_least_loaded_ready_replica() -> None:
    busy, idle, dead = StubReplica(3), StubReplica(1), StubReplica(0, ReplicaState.FAILED)
    router = Router([busy, idle, dead], max_outstanding=4)  # type: ignore[list-item]
    for i in range(3):
        router.submit([1], SamplingParams(), f"r{i}")
    assert idle.submitted == ["r0", "r1"] and busy.submitted == ["r2"] and dead.submitted == []
    assert router.outstanding == 7


def test_full_replicas_raise_capacity_error_with_retry_after() -> None:
    router = Router([StubReplica(2), StubReplica(2)], max_outstanding=2, retry_after_s=3)  # type: ignore[list-item]
    with pytest.raises(CapacityError) as info:
        router.submit([1], SamplingParams(), "r")
    assert info.value.retry_after_s == 3


@pytest.mark.parametrize(("state", "reason"), [(ReplicaState.LOADING, "loading"),
                                               (ReplicaState.STOPPED, "shutting down"),
                                               (ReplicaState.FAILED, "no engine replica")])
def test_no_ready_replica_is_engine_dead(state: ReplicaState, reason: str) -> None:
    with pytest.raises(EngineDeadError, match=reason):
        Router([StubReplica(0, state)], max_outstanding=1).submit([1], SamplingParams(), "r")  # type: ignore[list-item]


@pytest.mark.anyio
async def test_stats_are_summed_over_replicas() -> None:
    router = Router([StubReplica(2), StubReplica(3)], max_outstanding=9)  # type: ignore[list-item]
    stats = await router.stats()
    assert stats.num_running == 5 and stats.kv_blocks_total == 20 and stats.kv_blocks_free == 8
