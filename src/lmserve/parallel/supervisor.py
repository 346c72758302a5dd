"""Rank 0's end of a tensor-parallel group: start the workers, send them every step, and fail loudly
and quickly when one dies.

1. ``start_group`` opens the rendezvous store, spawns ranks 1..N-1 (``worker_main``) and joins the
   group with them; ``Supervisor.wait_until_loaded`` then waits for their models.
2. ``Supervisor.step`` broadcasts a step's inputs and runs rank 0's share of it; the workers run
   theirs on the same inputs, and the layers' collectives meet inside the forward.
3. A watchdog thread waits on the workers' process sentinels and, when one dies, kills the rest so
   that no collective on rank 0 waits for a dead peer; the engine then gets ``EngineDeadError``.
   Collectives also time out, and while the engine is idle a heartbeat thread sends ``IDLE`` so that
   a waiting worker can tell an idle engine from a dead one.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from lmserve.errors import EngineDeadError
from lmserve.parallel.group import GroupSpec, ProcessGroup, join_group, open_store
from lmserve.parallel.step import IDLE, STEP, STOP, StepInputs, send_step
from lmserve.parallel.worker import LoadRunner, joining_key, loaded_key, worker_error, worker_main
from lmserve.spawning import start_spawned

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # rank 0 sends an IDLE message when it has sent nothing for this long
WAIT_POLL_S = 0.05
T = TypeVar("T")


def start_group(degree: int, device_type: str, load: LoadRunner) -> Supervisor:
    """Spawn ranks 1..degree-1, each loading its runner with ``load``, and join the group with them
    as rank 0. Rendezvous is by ``MASTER_ADDR``/``MASTER_PORT`` (default: this host, a free port)."""
    ctx = multiprocessing.get_context("spawn")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    store = open_store(GroupSpec(0, degree, addr, int(os.environ.get("MASTER_PORT", "0"))))
    spec = GroupSpec(0, degree, addr, store.port, local_rank=0)
    workers: dict[int, BaseProcess] = {}
    for rank in range(1, degree):
        env = dataclasses.replace(spec, rank=rank, local_rank=rank).env()
        workers[rank] = ctx.Process(target=worker_main, args=(load, device_type, env),
                                    name=f"lmserve-tp-rank{rank}", daemon=True)
        start_spawned(workers[rank])
    try:
        _wait_for(store, [joining_key(r) for r in workers], workers, "joining the group")
        group = join_group(spec, device_type, store=store)
    except BaseException:
        _kill(workers)
        raise
    return Supervisor(group, workers)


class Supervisor:
    """Rank 0's end of the group, shared by the engine thread, the watchdog and the heartbeat.

    It holds no reference to the runner that owns it, so dropping the engine shuts the group down.
    """

    def __init__(self, group: ProcessGroup, workers: dict[int, BaseProcess]) -> None:
        self.group, self.workers = group, workers
        self.lock = threading.Lock()  # one message or step on the control group at a time
        self.closing = threading.Event()
        self.dead: str | None = None
        self.last_send = time.monotonic()

    @property
    def worker_pids(self) -> list[int | None]:
        return [proc.pid for proc in self.workers.values()]

    def wait_until_loaded(self) -> None:
        """Return once every worker has loaded its model; raise ``EngineDeadError`` if one exits."""
        _wait_for(self.group.store, [loaded_key(r) for r in self.workers], self.workers, "loading the model")

    def watch(self) -> None:
        """Start the watchdog and the heartbeat (once the group is ready)."""
        for name, target in (("watchdog", self._watchdog), ("heartbeat", self._heartbeat)):
            threading.Thread(target=target, name=f"lmserve-tp-{name}", daemon=True).start()

    def step(self, inputs: StepInputs, run: Callable[[StepInputs], T]) -> T:
        """Broadcast ``inputs`` to every rank, then ``run`` rank 0's share; any failure kills the group."""
        with self.lock:
            if self.dead is not None or self.closing.is_set():
                raise EngineDeadError(self.dead or "the tensor-parallel group was shut down")
            try:
                self.send(STEP, inputs)
                return run(inputs)
            except Exception as exc:
                time.sleep(0.2)  # let the watchdog name the rank that died, if one did
                self.fail(f"a tensor-parallel step failed on rank 0: {exc}")
                raise EngineDeadError(self.dead) from exc

    def send(self, command: int, inputs: StepInputs | None = None) -> None:
        send_step(self.group, command, inputs)
        self.last_send = time.monotonic()

    def fail(self, reason: str) -> None:
        """Record why the group died (the first reason wins) and stop every worker."""
        if self.dead is None:
            self.dead = reason
            log.error("tensor-parallel group failed: %s", reason)
        for proc in self.workers.values():
            if proc.is_alive():
                proc.kill()

    def close(self) -> None:
        """Stop the workers (politely if the group is healthy) and leave the process group."""
        if self.closing.is_set():
            return
        self.closing.set()
        if self.lock.acquire(timeout=5.0):
            try:
                if self.dead is None:
                    self.send(STOP)
            except Exception:  # noqa: BLE001 - best effort; the workers are stopped below anyway
                pass
            finally:
                self.lock.release()
        for proc in self.workers.values():
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        self.group.close()

    def _watchdog(self) -> None:
        by_sentinel: dict[Any, tuple[int, BaseProcess]] = {proc.sentinel: (rank, proc)
                                                           for rank, proc in self.workers.items()}
        while not self.closing.is_set():
            ready = multiprocessing.connection.wait(list(by_sentinel), timeout=0.5)
            if ready and not self.closing.is_set():
                rank, proc = by_sentinel[ready[0]]
                proc.join(timeout=1.0)
                self.fail(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
                          f"{worker_error(self.group.store, rank)}")
                return

    def _heartbeat(self) -> None:
        while not self.closing.wait(HEARTBEAT_S / 4):
            if time.monotonic() - self.last_send < HEARTBEAT_S or self.dead is not None:
                continue
            if self.lock.acquire(timeout=HEARTBEAT_S):
                try:
                    if self.dead is None and not self.closing.is_set():
                        self.send(IDLE)
                except Exception as exc:  # noqa: BLE001 - any failure here means the group is gone
                    self.fail(f"a heartbeat to the tensor-parallel workers failed: {exc}")
                finally:
                    self.lock.release()


def _wait_for(store: Any, keys: list[str], workers: dict[int, BaseProcess], what: str) -> None:
    """Wait until every key is set, failing at once when a worker exits first."""
    while not store.check(keys):
        for rank, proc in workers.items():
            if proc.exitcode is not None:
                raise EngineDeadError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code "
                                      f"{proc.exitcode} while {what}{worker_error(store, rank)}")
        time.sleep(WAIT_POLL_S)


def _kill(workers: dict[int, BaseProcess]) -> None:
    for proc in workers.values():
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5.0)
