"""``Launcher``: starts one model's replicas, restarts those that die, and scales their number.

1. ``start(n)`` places ``n`` replicas (``placement.place``) and starts their engine processes, all at
   once with ``option.parallel_loading``, else one after another; each has ``model_loading_timeout``
   to load. The first failure stops every replica and is raised: a model loads whole or not at all.
2. Once started, a replica whose process dies, whose engine fails, or whose engine stops sending
   heartbeats for ``heartbeat_timeout`` seconds (frozen: it is killed) has its requests in flight
   failed at once by its ``EngineClient``; the launcher then restarts it after a backoff (1 s, 2 s,
   4 s, ... capped), on the placement the current replica count gives it. A restart that becomes
   ready resets the count of consecutive failures; after ``retry_threshold`` failed restarts in a
   row the launcher gives up and reports the model failed (``on_failed``).
3. ``scale(n)`` adds replicas (started as in 1; a failure removes them again and is raised) or
   removes the highest-numbered ones: they take no new requests, get ``drain_timeout`` seconds to
   finish those in flight, and what is left is aborted with a clear error before they stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from lmserve.config.settings import WorkerConfig
from lmserve.engine.protocol import ModelInfo
from lmserve.errors import EngineDeadError, EngineFailedError
from lmserve.workers.engine_client import EngineClient
from lmserve.workers.messages import EngineSpec
from lmserve.workers.placement import Devices, is_oversubscribed, place
from lmserve.workers.replica import Replica
from lmserve.workers.replica_state import ReplicaState
from lmserve.workers.router import Router, drain

logger = logging.getLogger("lmserve.workers")


@dataclass(frozen=True)
class Backoff:
    """Delay before restart attempt ``k`` (0-based): ``first_s * 2**k``, at most ``max_s``."""

    first_s: float = 1.0
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.first_s * 2 ** min(attempt, 30))


class Launcher:
    """See the module docstring. ``router`` routes over the ready replicas."""

    def __init__(self, name: str, spec: EngineSpec, devices: Devices, workers: WorkerConfig,
                 backoff: Backoff | None = None,
                 on_failed: Callable[[BaseException], None] | None = None) -> None:  # fmt: skip
        self.name, self.spec, self.devices, self.workers = name, spec, devices, workers
        self.degree = spec.config.tensor_parallel_degree
        self.backoff = backoff or Backoff()
        self.on_failed = on_failed
        self.replicas: list[Replica] = []
        self.router = Router([], max_outstanding=workers.job_queue_size)
        self._restarts: dict[int, asyncio.Task[None]] = {}
        self._scaling = asyncio.Lock()
        self._supervising = False
        self._stopped = False

    # ---- starting and stopping -------------------------------------------------------------------

    async def start(self, count: int) -> ModelInfo:
        """Start ``count`` replicas and wait for all of them; returns the model's facts."""
        new = self._add_replicas(count)
        try:
            await self._launch_all(new)
        except BaseException:
            await self.stop()
            raise
        self._supervising = True
        assert new[0].model_info is not None
        return new[0].model_info

    async def stop(self) -> None:
        """Stop every replica (requests in flight end with an error) and all supervision."""
        self._stopped = True
        for task in self._restarts.values():
            task.cancel()
        await asyncio.gather(*self._restarts.values(), return_exceptions=True)
        for replica in self.replicas:
            replica.hold = ReplicaState.STOPPED
        await asyncio.gather(*(_retire(replica.client) for replica in self.replicas))

    # ---- scaling ---------------------------------------------------------------------------------

    async def scale(self, count: int, drain_timeout: float) -> None:
        """Run ``count`` replicas: start new ones, or drain and stop the highest-numbered."""
        if count < 1:
            raise ValueError(f"a model needs at least one replica, got {count}")
        async with self._scaling:
            if count > len(self.replicas):
                new = self._add_replicas(count)
                try:
                    await self._launch_all(new)
                except BaseException:
                    await self._remove(new, 0.0, EngineDeadError("the replica failed to start"))
                    raise
            elif count < len(self.replicas):
                error = EngineDeadError("the replica was stopped by a scale-down before the request finished")
                await self._remove(self.replicas[count:], drain_timeout, error)
            logger.info("%s: %d replica(s)", self.name, len(self.replicas))

    def check_count(self, total: int) -> None:
        """Raise ``ConfigError`` when the devices cannot hold ``total`` replicas."""
        place(self.devices, self.degree, total, total - 1)

    def _add_replicas(self, total: int) -> list[Replica]:
        self.check_count(total)
        if is_oversubscribed(self.devices, self.degree, total):
            logger.warning("%s: %d replica(s) x %d rank(s) on %d core(s): cores are shared", self.name, total,
                           self.degree, len(self.devices.cores))  # fmt: skip
        new = [Replica(i, place(self.devices, self.degree, total, i)) for i in range(len(self.replicas), total)]
        self.replicas.extend(new)
        self.router.replicas = list(self.replicas)
        return new

    async def _remove(self, victims: list[Replica], drain_timeout: float, error: BaseException) -> None:
        for replica in victims:
            replica.hold = ReplicaState.DRAINING  # the router sends it nothing more
            task = self._restarts.pop(replica.index, None)
            if task is not None:
                task.cancel()
        await asyncio.gather(*(_drain(replica, drain_timeout, error) for replica in victims))
        self.replicas = [replica for replica in self.replicas if replica not in victims]
        self.router.replicas = list(self.replicas)

    # ---- one replica -----------------------------------------------------------------------------

    async def _launch_all(self, replicas: list[Replica]) -> None:
        if not self.workers.parallel_loading:
            for replica in replicas:
                await self._launch(replica)
            return
        launches = [asyncio.create_task(self._launch(replica)) for replica in replicas]
        try:
            await asyncio.gather(*launches)
        except BaseException:  # the first failure stops the others' waiting too
            for launch in launches:
                launch.cancel()
            await asyncio.gather(*launches, return_exceptions=True)
            raise

    async def _launch(self, replica: Replica) -> None:
        """Start a new engine process in ``replica`` and wait until it is ready (or raise why not)."""
        client = self._new_client(replica)
        client.on_failure.append(lambda failed: self._on_failure(replica, failed))
        replica.client, replica.hold = client, ReplicaState.LOADING  # a failure now is the caller's to handle
        await client.start()
        await client.wait_ready(timeout=self.workers.model_loading_timeout_s)
        replica.mark_ready()

    def _new_client(self, replica: Replica) -> EngineClient:
        """The client of a new process for ``replica`` (not started yet); a subclass may start
        another kind of worker with the same lifecycle interface."""
        spec = EngineSpec(self.spec.factory, replica.placement.engine_config(self.spec.config), self.spec.options)
        return EngineClient(spec, name=f"{self.name}/{replica.name}", placement=replica.placement,
                            heartbeat_timeout=self.workers.heartbeat_timeout_s)  # fmt: skip

    def _on_failure(self, replica: Replica, client: EngineClient) -> None:
        """A replica's engine failed (its requests were already failed): restart it, unless the
        model is still loading, stopping, or this replica is already being restarted or removed."""
        replica.error = client.error
        if not self._supervising or self._stopped or client is not replica.client or replica.hold is not None:
            return
        replica.hold = ReplicaState.RESTARTING
        self._restarts[replica.index] = asyncio.create_task(self._restart(replica), name=f"restart-{replica.name}")

    async def _restart(self, replica: Replica) -> None:
        """Restart ``replica`` with backoff until it is ready, or give up after ``retry_threshold``."""
        try:
            while replica.consecutive_failures < self.workers.retry_threshold:
                replica.hold = ReplicaState.RESTARTING
                delay = self.backoff.delay(replica.consecutive_failures)
                logger.warning("%s/%s failed (%s); restarting in %gs (failed restarts so far: %d of %d)", self.name,
                               replica.name, replica.error, delay, replica.consecutive_failures,
                               self.workers.retry_threshold)  # fmt: skip
                await asyncio.sleep(delay)
                await _retire(replica.client)
                replica.placement = place(self.devices, self.degree, len(self.replicas), replica.index)
                replica.restarts += 1
                try:
                    await self._launch(replica)
                except Exception as exc:  # noqa: BLE001 - every failed start counts alike
                    replica.error, replica.consecutive_failures = exc, replica.consecutive_failures + 1
                    continue
                logger.info("%s/%s is back (pid %s)", self.name, replica.name, replica.pid)
                return
            self._give_up(replica)
        finally:
            self._restarts.pop(replica.index, None)

    def _give_up(self, replica: Replica) -> None:
        replica.hold = ReplicaState.FAILED
        error = EngineFailedError(f"{replica.name} failed {replica.consecutive_failures} restart(s) in a row "
                                f"(retry_threshold {self.workers.retry_threshold}): {replica.error}")  # fmt: skip
        logger.error("%s: %s", self.name, error)
        if self.on_failed is not None:
            self.on_failed(error)


async def _drain(replica: Replica, timeout: float, error: BaseException) -> None:
    """Let ``replica`` finish its requests for up to ``timeout`` seconds, abort the rest, stop it."""
    await drain(replica, timeout, error)
    await _retire(replica.client)
    replica.hold = ReplicaState.STOPPED


async def _retire(client: EngineClient | None) -> None:
    """Stop an engine process and free its sockets (a dead one included)."""
    if client is not None:
        with contextlib.suppress(Exception):
            await client.shutdown()
