"""``Replica``: one supervised slot of a model, the placement it owns and the engine process filling it.

The router sees a replica as it sees an engine client (``state``, ``outstanding``, ``submit``,
``abort_all``, ``stats``); the launcher swaps the process behind it when it restarts one. The slot
keeps what outlives a process: its counters (requests routed to it, restarts, consecutive failed
starts) and the last error.
"""

from __future__ import annotations

import time
from typing import Any

from lmserve.engine.protocol import EngineStats, ModelInfo
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import EngineDeadError
from lmserve.workers.engine_client import EngineClient
from lmserve.workers.placement import Placement
from lmserve.workers.replica_state import ReplicaState
from lmserve.workers.request_stream import RequestStream


class Replica:
    """See the module docstring. ``hold`` is a state the launcher imposes (``RESTARTING``,
    ``DRAINING``, ``FAILED`` for good, ``STOPPED``); without one the process's state shows."""

    def __init__(self, index: int, placement: Placement) -> None:
        self.index, self.placement = index, placement
        self.name = f"replica-{index}"
        self.client: EngineClient | None = None
        self.hold: ReplicaState | None = ReplicaState.LOADING
        self.error: BaseException | None = None
        self.requests_total = 0  # requests the router sent here, over every process
        self.restarts = 0  # processes started after the first
        self.consecutive_failures = 0  # failed starts since the last one that became ready
        self.ready_since: float | None = None

    @property
    def state(self) -> ReplicaState:
        if self.hold is not None:
            return self.hold
        return self.client.state if self.client is not None else ReplicaState.LOADING

    @property
    def pid(self) -> int | None:
        return self.client.pid if self.client is not None else None

    @property
    def model_info(self) -> ModelInfo | None:
        return self.client.model_info if self.client is not None else None

    @property
    def outstanding(self) -> int:
        return self.client.outstanding if self.client is not None else 0

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
               deadline: float | None = None) -> RequestStream:
        """Send a request to this replica's engine (see ``EngineClient.submit``)."""
        if self.client is None or self.state is not ReplicaState.READY:
            raise EngineDeadError(f"{self.name} is {self.state.value}")
        stream = self.client.submit(prompt_token_ids, params, request_id, deadline)
        self.requests_total += 1
        return stream

    def abort_all(self, error: BaseException) -> None:
        if self.client is not None:
            self.client.abort_all(error)

    async def stats(self, timeout: float = 5.0) -> EngineStats:
        if self.client is None:
            raise EngineDeadError(f"{self.name} has no engine")
        return await self.client.stats(timeout)

    def mark_ready(self) -> None:
        self.hold, self.consecutive_failures, self.ready_since = None, 0, time.time()

    def describe(self, stats: EngineStats | None = None) -> dict[str, Any]:
        """The replica as the management API shows it."""
        out: dict[str, Any] = {
            "id": self.index, "state": self.state.value, "pid": self.pid, "devices": self.placement.describe(),
            "outstanding": self.outstanding, "requests_total": self.requests_total, "restarts": self.restarts,
            "consecutive_failures": self.consecutive_failures, "ready_since": self.ready_since,
        }  # fmt: skip
        if self.error is not None:
            out["error"] = str(self.error)
        if stats is not None:
            out |= {"running": stats.num_running, "waiting": stats.num_waiting, "kv_cache_usage": round(stats.kv_usage, 4),
                    "kv_blocks_used": stats.kv_blocks_total - stats.kv_blocks_free}  # fmt: skip
        return out
