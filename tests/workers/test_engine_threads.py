"""Which engine processes adapt their kernel threads, and that the loop consults the governor each
step (the governor's own decisions are tested in tests/engine/test_cpu_threads.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch  # noqa: F401 - an engine that computes with torch has imported it
import zmq

from lmserve.config.settings import EngineConfig
from lmserve.engine.cpu_threads import CpuThreadGovernor
from lmserve.engine.protocol import ModelInfo
from lmserve.workers.engine_process import EngineLoop, _thread_governor
from lmserve.workers.messages import EngineSpec, encode_spec


@dataclass
class StubEngine:
    device: str = "cpu"
    degree: int = 1
    steps: int = 0
    sent: list[Any] = field(default_factory=list)

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo("m", 64, 10, "bfloat16", self.device, self.degree, (2,), 4, 64, 256)

    def step(self) -> list[Any]:
        self.steps += 1
        return []


def spec(**config: Any) -> bytes:
    return encode_spec(EngineSpec("m:f", EngineConfig(model="m", **config)))


@pytest.mark.parametrize(("engine", "config", "adapts"), [
    (StubEngine(), {}, True),
    (StubEngine(), {"adaptive_threads": False}, False),  # the operator fixed the count
    (StubEngine(device="cuda:0"), {}, False),
    (StubEngine(degree=2), {}, False),  # the ranks would count each other as other processes
])  # fmt: skip
def test_only_a_single_cpu_rank_adapts_its_threads(engine, config, adapts):
    assert (_thread_governor(spec(**config), engine) is not None) == adapts


def test_the_loop_consults_the_governor_after_each_step():
    calls: list[int] = []

    class Counting(CpuThreadGovernor):
        def after_step(self) -> None:
            calls.append(1)

    engine = StubEngine()
    loop = EngineLoop(engine, None, None, Counting(2, 2, lambda: None, lambda n: None))  # type: ignore[arg-type]
    assert loop._step() and loop._step()
    assert engine.steps == 2 and len(calls) == 2


class Inbox:
    """A socket stand-in: ``poll`` (a blocking wait) records how far idle work had got; the second
    wait finds a ``Shutdown``."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.waits, self.pending = engine, [], False

    def poll(self, timeout_ms: int) -> bool:
        self.waits.append(self.engine.warm_calls)
        self.pending = len(self.waits) >= 2
        return self.pending

    def recv(self, flags: int = 0) -> bytes:
        from lmserve.workers.messages import Shutdown, encode

        if self.pending:
            self.pending = False
            return encode(Shutdown())
        raise zmq.Again


def test_an_idle_loop_does_its_idle_work_before_it_blocks():
    class Warming(StubEngine):
        warm_calls = 0

        def has_unfinished_requests(self) -> bool:
            return False

        def warm_idle(self) -> bool:
            self.warm_calls += 1
            return self.warm_calls < 3  # two calls leave more to do, the third finishes

    engine = Warming()
    inbox = Inbox(engine)
    assert EngineLoop(engine, inbox, None).run() is True  # type: ignore[arg-type]
    # No blocking wait while idle work was left; once done, the loop waits (and asks again after).
    assert inbox.waits == [3, 4]
