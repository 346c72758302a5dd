"""``Router``: spreads one model's requests over its replicas, and bounds how many each takes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from lmserve.engine.protocol import EngineStats
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import CapacityError, EngineDeadError, ShuttingDownError
from lmserve.workers.replica_state import ReplicaState
from lmserve.workers.request_stream import RequestStream

_DRAIN_POLL_S = 0.05


class Routable(Protocol):
    """What the router needs of a replica (an ``EngineClient`` or a supervised ``Replica``)."""

    error: BaseException | None

    @property
    def state(self) -> ReplicaState: ...

    @property
    def outstanding(self) -> int: ...

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
               deadline: float | None = None) -> RequestStream: ...

    def abort_all(self, error: BaseException) -> None: ...

    async def stats(self, timeout: float = ...) -> EngineStats: ...


class Drainable(Protocol):
    """What ``drain`` needs: a ``Router`` (a whole model) or one ``Replica``."""

    @property
    def outstanding(self) -> int: ...

    def abort_all(self, error: BaseException) -> None: ...


async def drain(target: Drainable, timeout: float, error: BaseException) -> int:
    """Wait up to ``timeout`` seconds for ``target``'s requests in flight to finish, then abort the
    rest, each ending with ``error``; returns how many were aborted. The caller has already stopped
    sending ``target`` new requests. It polls: a drain is rare and lasts seconds, so a 50 ms look
    costs nothing and needs no signal from every place a request can end."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while target.outstanding and loop.time() < end:
        await asyncio.sleep(_DRAIN_POLL_S)
    left = target.outstanding
    if left:
        target.abort_all(error)
    return left


class Router:
    """Picks the ready replica with the fewest outstanding requests; ties go round-robin, so a
    light load still reaches every replica.

    Each replica takes at most ``max_outstanding`` requests (``job_queue_size``): running and waiting
    in its engine together, since continuous batching admits every request to the engine at once.
    When the least-loaded replica is full, all are, and ``submit`` raises ``CapacityError``.
    """

    def __init__(self, replicas: Sequence[Routable], max_outstanding: int,
                 retry_after_s: float = 1.0) -> None:
        if max_outstanding < 1:
            raise ValueError(f"max_outstanding must be >= 1, got {max_outstanding}")
        self.replicas: list[Routable] = list(replicas)  # the launcher adds and removes replicas here
        self.max_outstanding = max_outstanding
        self.retry_after_s = retry_after_s
        self._turn = 0

    @property
    def outstanding(self) -> int:
        return sum(replica.outstanding for replica in self.replicas)

    def ready_replicas(self) -> list[Routable]:
        return [replica for replica in self.replicas if replica.state is ReplicaState.READY]

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
               deadline: float | None = None) -> RequestStream:
        """Send a request to the least-loaded ready replica. Raises ``EngineDeadError`` when none is
        ready and ``CapacityError`` when every ready replica is full."""
        ready = self.ready_replicas()
        if not ready:
            raise self._why_none_ready()
        start, self._turn = self._turn % len(ready), self._turn + 1
        replica = min(ready[start:] + ready[:start], key=lambda r: r.outstanding)
        if replica.outstanding >= self.max_outstanding:
            raise CapacityError(
                f"the server is at capacity ({self.max_outstanding} requests per replica, job_queue_size); "
                "retry later", retry_after_s=self.retry_after_s,
            )  # fmt: skip
        return replica.submit(prompt_token_ids, params, request_id, deadline)

    def abort_all(self, error: BaseException) -> None:
        """Abort every request in flight on every replica; each one's consumer receives ``error``."""
        for replica in self.replicas:
            replica.abort_all(error)

    async def stats(self, timeout: float = 5.0) -> EngineStats:
        """The engines' counters, summed over the ready replicas that answer within ``timeout``
        seconds: one busy with a long step, or frozen and not yet found out, is left out rather
        than waited for."""
        answers = await asyncio.gather(*(r.stats(timeout) for r in self.ready_replicas()), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, (TimeoutError, EngineDeadError)):
                raise answer
        snapshots = [answer for answer in answers if isinstance(answer, EngineStats)]
        if answers and not snapshots:
            raise EngineDeadError(f"no replica answered within {timeout:g}s")
        total: dict[str, int] = {}
        for snapshot in snapshots:
            for name, value in vars(snapshot).items():
                total[name] = total.get(name, 0) + value
        return EngineStats(**total)

    def _why_none_ready(self) -> EngineDeadError:
        states = {replica.state for replica in self.replicas}
        errors = "; ".join(str(r.error) for r in self.replicas if r.error is not None)
        if ReplicaState.RESTARTING in states or ReplicaState.LOADING in states and errors:
            return EngineDeadError(f"no engine replica is ready; restarting after: {errors or 'a failure'}")
        if ReplicaState.LOADING in states:
            return EngineDeadError("the model is still loading")
        if ReplicaState.STOPPED in states or ReplicaState.DRAINING in states:
            return ShuttingDownError("the server is shutting down")
        return EngineDeadError(f"no engine replica is running: {errors or 'all failed'}")
