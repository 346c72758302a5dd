"""Which engine processes adapt their kernel threads, and that the loop consults the governor each
step (the governor's own decisions are tested in tests/engine/test_cpu_threads.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch  # noqa: F401 - an engine that computes with torch has imported it

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
