"""Ranks 1..N-1 of a tensor-parallel group: join, load this rank's share, run every step rank 0 sends.

The rank's model runner comes from the caller (``load``, a picklable callable such as
``functools.partial(ModelRunner, config)``), so this package needs no knowledge of the engine.
Progress and failure are reported through the rendezvous store, where rank 0's supervisor reads them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

import torch

from lmserve.parallel.group import GroupSpec, ProcessGroup, join_group, open_store
from lmserve.parallel.state import ParallelState
from lmserve.parallel.step import STEP, STOP, StepInputs, receive_step

log = logging.getLogger(__name__)


class RankRunner(Protocol):
    """One rank's share of the model and its KV cache (``lmserve.engine.model_runner.ModelRunner``)."""

    @property
    def num_blocks(self) -> int: ...

    def shrink_kv_cache(self, num_blocks: int) -> None:
        """Keep only ``num_blocks`` KV-cache blocks."""

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run one step's forward pass on this rank."""


LoadRunner = Callable[[ParallelState], RankRunner]


# Keys in the rendezvous store through which a worker reports to rank 0.
def joining_key(rank: int) -> str:
    return f"lmserve/joining/{rank}"


def loaded_key(rank: int) -> str:
    return f"lmserve/loaded/{rank}"


def error_key(rank: int) -> str:
    return f"lmserve/error/{rank}"


def agree_on_kv_blocks(runner: RankRunner, group: ProcessGroup) -> None:
    """Shrink every rank's KV cache to the smallest rank's: block ids mean the same on every rank."""
    import torch.distributed as dist

    blocks = torch.tensor([runner.num_blocks], dtype=torch.int64)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=group.control)
    smallest = int(blocks.item())
    if smallest < runner.num_blocks:
        runner.shrink_kv_cache(smallest)


def worker_main(load: LoadRunner, device_type: str, env: dict[str, str]) -> None:
    """Entry point of ranks 1..N-1 (spawned by rank 0, or started by a launcher on another host with
    the same environment variables): load this rank's share, then run every step rank 0 sends."""
    os.environ.update(env)
    spec = GroupSpec.from_env()
    store = open_store(spec)
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        store.set(joining_key(spec.rank), "1")
        group = join_group(spec, device_type, store=store)
        runner = load(group.state)
        store.set(loaded_key(spec.rank), "1")
        agree_on_kv_blocks(runner, group)
        serve_steps(runner, group)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # rank 0 (and its store) may be gone already
            store.set(error_key(spec.rank), f"{type(exc).__name__}: {exc}")
        log.error("tensor-parallel rank %d failed:\n%s", spec.rank, traceback.format_exc())
        raise SystemExit(1) from exc
    group.close()


def serve_steps(runner: RankRunner, group: ProcessGroup) -> None:
    """Run the steps rank 0 broadcasts until it says STOP (IDLE messages only show it is alive)."""
    while True:
        command, inputs = receive_step(group)
        if command == STOP:
            return
        if command == STEP and inputs is not None:
            runner.execute(inputs)


def worker_error(store: Any, rank: int) -> str:
    """``": <the error rank reported>"``, or an empty string when it reported none."""
    key = error_key(rank)
    try:
        return f": {store.get(key).decode()}" if store.check([key]) else ""
    except Exception:  # noqa: BLE001 - the store may be gone with its ranks
        return ""


def _exit_with_parent(parent: int) -> None:
    # Spawned workers outliving a killed engine would hold devices and memory forever.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
