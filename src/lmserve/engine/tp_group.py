"""Tensor-parallel execution: the engine's process is rank 0 and drives N-1 worker processes.

1. ``start_runner`` checks the degree, converts the checkpoint to its pre-sharded form when that
   pays, and returns a plain ``ModelRunner`` at degree 1 or a ``TPGroup`` above it.
2. ``TPGroup`` opens the rendezvous store, spawns ranks 1..N-1 (``worker_main``), joins the group and
   loads rank 0's ``ModelRunner``; every rank then agrees on the smallest KV-cache size.
3. Each step rank 0 broadcasts the ``StepInputs`` (a fixed header, then one int64 payload) over the
   gloo control group and runs its forward; the workers run theirs on the same inputs, and the layers'
   collectives meet inside the forward. Only rank 0 returns logits.
4. Failure is loud and quick: a watchdog thread waits on the workers' process sentinels and, when one
   dies, terminates the rest so that no collective on rank 0 waits for a dead peer; the engine then
   gets ``EngineDeadError``. Collectives also time out, and while the engine is idle rank 0 sends
   heartbeats so that a waiting worker can tell an idle engine from a dead one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
import traceback
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmserve.config.settings import EngineConfig
from lmserve.engine.kv_cache import allocate_kv_cache
from lmserve.engine.model_runner import ModelRunner, StepInputs
from lmserve.engine.request import Request
from lmserve.errors import ConfigError, EngineDeadError
from lmserve.kernels.device import resolve_device, resolve_dtype
from lmserve.models.checkpoint import CheckpointInfo, describe_checkpoint
from lmserve.parallel.group import (
    GroupSpec,
    ProcessGroup,
    check_degree,
    join_group,
    open_store,
    threads_per_rank,
)
from lmserve.parallel.state import ParallelState

log = logging.getLogger(__name__)

IDLE, STEP, STOP = 0, 1, 2  # commands in the step header
HEARTBEAT_S = 2.0  # rank 0 sends an IDLE message when it has sent nothing for this long
WAIT_POLL_S = 0.05
_FIELDS = [f.name for f in dataclasses.fields(StepInputs)]
_DTYPES = [torch.int64, torch.int32]  # the integer dtypes StepInputs tensors come in
_HEADER = 2 + 3 * len(_FIELDS)  # command, payload length, then (dtype, rows, columns or -1) per field


def start_runner(config: EngineConfig, progress: bool = True) -> ModelRunner | TPGroup:
    """The runner for ``config``: its checkpoint converted first where that pays (see
    ``lmserve.convert.conversion_pays``), then one ``ModelRunner`` or a tensor-parallel group."""
    degree = config.tensor_parallel_degree
    device = resolve_device(config.device)
    model_dir = Path(config.model)
    dtype = resolve_dtype(config.dtype, device)
    info = describe_checkpoint(model_dir, dtype, device, config.max_model_len)
    check_degree(degree, info.config.num_heads, device.type)
    if degree > 1:
        check_layers_split(info, degree)
    _convert_if_it_pays(model_dir, degree, dtype, progress)
    if degree == 1:
        return ModelRunner(config, progress=progress)
    return TPGroup(config, progress=progress)


def check_layers_split(info: CheckpointInfo, degree: int) -> None:
    """Build rank 0's (uninitialised) model to see that every layer splits ``degree`` ways, before
    any process starts; a layer that cannot says which size does not divide."""
    try:
        info.empty_model(ParallelState(0, degree))
    except ValueError as exc:
        raise ConfigError("tensor_parallel_degree", degree, f"a degree this model's layers split into; {exc}") from exc


def _convert_if_it_pays(model_dir: Path, degree: int, dtype: torch.dtype, progress: bool) -> None:
    from lmserve.convert import conversion_pays, ensure_converted

    if not conversion_pays(model_dir, degree, dtype):
        return
    try:
        ensure_converted(model_dir, degree, dtype, progress=progress)
    except OSError as exc:  # a full disk or read-only cache costs speed, not the ability to serve
        log.warning("could not cache a pre-sharded conversion (%s); loading %s directly", exc, model_dir)


def rank_config(config: EngineConfig, degree: int, device_type: str) -> EngineConfig:
    """What each rank's ``ModelRunner`` gets: its share of the host's cores and, on the CPU (where
    all ranks share one memory), its share of the KV-cache memory budget."""
    if device_type != "cpu":
        return config
    return dataclasses.replace(config, num_threads=config.num_threads or threads_per_rank(degree),
                               kv_cache_memory_fraction=config.kv_cache_memory_fraction / degree)


# -- step messages ---------------------------------------------------------------------------------
def encode_step(command: int, inputs: StepInputs | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) int64 tensors carrying ``inputs``; both empty-bodied for IDLE and STOP."""
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0] = command
    if inputs is None:
        return header, torch.empty(0, dtype=torch.int64)
    parts = []
    for i, name in enumerate(_FIELDS):
        t: torch.Tensor = getattr(inputs, name)
        assert t.dim() <= 2 and t.dtype in _DTYPES, f"{name}: {t.dtype} {tuple(t.shape)} is not a step tensor"
        shape = list(t.shape) + [-1] * (2 - t.dim())
        header[2 + 3 * i: 5 + 3 * i] = torch.tensor([_DTYPES.index(t.dtype), *shape])
        parts.append(t.reshape(-1).to(torch.int64))
    payload = torch.cat(parts)
    header[1] = payload.numel()
    return header, payload


def decode_step(header: torch.Tensor, payload: torch.Tensor) -> StepInputs:
    """The ``StepInputs`` that ``encode_step`` packed, dtypes and shapes restored."""
    fields, offset = {}, 0
    for i, name in enumerate(_FIELDS):
        code, *dims = header[2 + 3 * i: 5 + 3 * i].tolist()
        shape = [d for d in dims if d >= 0]
        count = int(torch.Size(shape).numel())
        fields[name] = payload[offset: offset + count].view(shape).to(_DTYPES[code])
        offset += count
    return StepInputs(**fields)


class _Link:
    """Rank 0's end of the group, shared by the engine thread, the watchdog and the heartbeat.

    It holds no reference to the ``TPGroup``, so dropping the engine shuts the group down.
    """

    def __init__(self, group: ProcessGroup, workers: dict[int, Any]) -> None:
        self.group, self.workers = group, workers
        self.lock = threading.Lock()  # one message or step on the control group at a time
        self.closing = threading.Event()
        self.dead: str | None = None
        self.last_send = time.monotonic()

    def send(self, command: int, inputs: StepInputs | None = None) -> None:
        import torch.distributed as dist

        header, payload = encode_step(command, inputs)
        dist.broadcast(header, src=0, group=self.group.control)
        if payload.numel():
            dist.broadcast(payload, src=0, group=self.group.control)
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


def _watchdog(link: _Link) -> None:
    by_sentinel = {proc.sentinel: (rank, proc) for rank, proc in link.workers.items()}
    while not link.closing.is_set():
        ready = multiprocessing.connection.wait(list(by_sentinel), timeout=0.5)
        if ready and not link.closing.is_set():
            rank, proc = by_sentinel[ready[0]]
            proc.join(timeout=1.0)
            link.fail(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
                      f"{_worker_error(link.group.store, rank)}")
            return


def _heartbeat(link: _Link) -> None:
    while not link.closing.wait(HEARTBEAT_S / 4):
        if time.monotonic() - link.last_send < HEARTBEAT_S or link.dead is not None:
            continue
        if link.lock.acquire(timeout=HEARTBEAT_S):
            try:
                if link.dead is None and not link.closing.is_set():
                    link.send(IDLE)
            except Exception as exc:  # noqa: BLE001 - any failure here means the group is gone
                link.fail(f"a heartbeat to the tensor-parallel workers failed: {exc}")
            finally:
                link.lock.release()


def _worker_error(store: Any, rank: int) -> str:
    key = f"lmserve/error/{rank}"
    try:
        return f": {store.get(key).decode()}" if store.check([key]) else ""
    except Exception:  # noqa: BLE001 - the store may be gone with its ranks
        return ""


class TPGroup:
    """Rank 0 of a tensor-parallel group, with ``ModelRunner``'s interface (``prepare``, ``execute``,
    ``model_config``, ``num_blocks``, ``kv_spec``, ``device``, ``dtype`` ...)."""

    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("this process already runs a tensor-parallel group; one per process "
                               "(shut the previous engine's runner down first)")
        self.degree = degree = config.tensor_parallel_degree
        device_type = resolve_device(config.device).type
        config = rank_config(config, degree, device_type)
        ctx = multiprocessing.get_context("spawn")
        store = open_store(GroupSpec(0, degree, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                     int(os.environ.get("MASTER_PORT", "0"))))
        spec = GroupSpec(0, degree, os.environ.get("MASTER_ADDR", "127.0.0.1"), store.port, local_rank=0)
        workers = {}
        for rank in range(1, degree):
            env = dataclasses.replace(spec, rank=rank, local_rank=rank).env()
            workers[rank] = ctx.Process(target=worker_main, args=(config, env), name=f"lmserve-tp-rank{rank}",
                                        daemon=True)
            workers[rank].start()
        try:
            _wait_for(store, [f"lmserve/joining/{r}" for r in workers], workers, "joining the group")
            group = join_group(spec, device_type, store=store)
        except BaseException:
            _kill(workers)
            raise
        self._link = _Link(group, workers)
        self._finalizer = weakref.finalize(self, self._link.close)
        try:
            self.runner = ModelRunner(config, group.state, progress=progress)
            _wait_for(store, [f"lmserve/loaded/{r}" for r in workers], workers, "loading the model")
            agree_on_kv_blocks(self.runner, group)
        except BaseException:
            self._link.fail("rank 0 could not start")
            self._finalizer()
            raise
        for target in (_watchdog, _heartbeat):
            threading.Thread(target=target, args=(self._link,), name=f"lmserve-tp-{target.__name__[1:]}",
                             daemon=True).start()
        log.info("tensor-parallel group of %d ranks ready (workers: pids %s)", degree, self.worker_pids)

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._link.workers.values()]

    def __getattr__(self, name: str) -> Any:
        # Everything else the engine reads (model_config, num_blocks, kv_spec, device, dtype, ...).
        if name in ("runner", "_link"):
            raise AttributeError(name)
        return getattr(self.runner, name)

    def prepare(self, requests: Sequence[Request], num_new_tokens: Sequence[int]) -> StepInputs:
        return self.runner.prepare(requests, num_new_tokens)

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Broadcast the step to every rank, run rank 0's share, return its logits."""
        link = self._link
        with link.lock:
            if link.dead is not None or link.closing.is_set():
                raise EngineDeadError(link.dead or "the tensor-parallel group was shut down")
            try:
                link.send(STEP, inputs)
                return self.runner.execute(inputs)
            except Exception as exc:
                time.sleep(0.2)  # let the watchdog name the rank that died, if one did
                link.fail(f"a tensor-parallel step failed on rank 0: {exc}")
                raise EngineDeadError(link.dead) from exc

    def shutdown(self) -> None:
        """Stop the workers and leave the process group; the runner cannot be used afterwards."""
        self._finalizer()


def agree_on_kv_blocks(runner: ModelRunner, group: ProcessGroup) -> None:
    """Shrink every rank's KV cache to the smallest rank's: block ids mean the same on every rank."""
    import torch.distributed as dist

    blocks = torch.tensor([runner.num_blocks], dtype=torch.int64)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=group.control)
    smallest = int(blocks.item())
    if smallest < runner.num_blocks:
        runner.kv_caches = []  # free the larger cache before allocating the smaller one
        runner.kv_caches = allocate_kv_cache(runner.kv_spec, smallest, runner.device)
        runner.num_blocks = smallest


def _wait_for(store: Any, keys: list[str], workers: dict[int, Any], what: str) -> None:
    """Wait until every key is set, failing at once when a worker exits first."""
    while not store.check(keys):
        for rank, proc in workers.items():
            if proc.exitcode is not None:
                raise EngineDeadError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code "
                                      f"{proc.exitcode} while {what}{_worker_error(store, rank)}")
        time.sleep(WAIT_POLL_S)


def _kill(workers: dict[int, Any]) -> None:
    for proc in workers.values():
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5.0)


# -- the worker side -------------------------------------------------------------------------------
def worker_main(config: EngineConfig, env: dict[str, str]) -> None:
    """Entry point of ranks 1..N-1 (spawned by ``TPGroup``, or started by a launcher on another host
    with the same environment variables): load this rank's share, then run every step rank 0 sends."""
    os.environ.update(env)
    spec = GroupSpec.from_env()
    store = open_store(spec)
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        store.set(f"lmserve/joining/{spec.rank}", "1")
        group = join_group(spec, resolve_device(config.device).type, store=store)
        runner = ModelRunner(config, group.state, progress=False)
        store.set(f"lmserve/loaded/{spec.rank}", "1")
        agree_on_kv_blocks(runner, group)
        serve_steps(runner, group)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # rank 0 (and its store) may be gone already
            store.set(f"lmserve/error/{spec.rank}", f"{type(exc).__name__}: {exc}")
        log.error("tensor-parallel rank %d failed:\n%s", spec.rank, traceback.format_exc())
        raise SystemExit(1) from exc
    group.close()


def serve_steps(runner: ModelRunner, group: ProcessGroup) -> None:
    """Run the steps rank 0 broadcasts until it says STOP."""
    import torch.distributed as dist

    header = torch.empty(_HEADER, dtype=torch.int64)
    while True:
        dist.broadcast(header, src=0, group=group.control)
        command = int(header[0])
        if command == STOP:
            return
        if command == STEP:
            payload = torch.empty(int(header[1]), dtype=torch.int64)
            dist.broadcast(payload, src=0, group=group.control)
            runner.execute(decode_step(header, payload))


def _exit_with_parent(parent: int) -> None:
    # Spawned workers outliving a killed engine would hold devices and memory forever.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
