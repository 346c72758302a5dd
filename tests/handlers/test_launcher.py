"""HandlerLauncher without HTTP: stopping it answers every request, running or waiting."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from lmserve.config.settings import BatchingConfig, EngineConfig, WorkerConfig
from lmserve.errors import EngineDeadError
from lmserve.handlers.launcher import HandlerLauncher
from lmserve.handlers.messages import HandlerSpec, Item
from lmserve.handlers.setup import handler_model_info
from lmserve.workers.messages import EngineSpec
from lmserve.workers.placement import detect_devices
from tests.server.conftest import serving_config

SLOW = """
    import time

    def handle(inputs):
        if inputs.is_empty():
            return None
        time.sleep(30)
"""


def test_stopping_fails_the_running_batch_and_the_queued_requests(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(textwrap.dedent(SLOW))

    async def go() -> list[BaseException | object]:
        launcher = HandlerLauncher("m", HandlerSpec(str(tmp_path / "model.py"), str(tmp_path)),
                                   EngineSpec("", EngineConfig(model=str(tmp_path))),
                                   handler_model_info(serving_config(tmp_path)), detect_devices("cpu", 1),
                                   WorkerConfig(cpu_devices=1), BatchingConfig(batch_size=1))  # fmt: skip
        await launcher.start(1)
        requests = [asyncio.create_task(launcher.infer(Item({}, {"data": b"{}"}))) for _ in range(3)]
        await asyncio.sleep(0.5)  # one batch runs (for 30 s), two wait
        await launcher.stop()
        return await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 10)

    results = asyncio.run(go())
    assert len(results) == 3
    for result in results:
        assert isinstance(result, EngineDeadError) and "shutting down" in str(result)


def test_a_request_with_no_worker_running_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        launcher = HandlerLauncher("m", HandlerSpec("x.py", str(tmp_path)), EngineSpec("", EngineConfig(model="x")),
                                   handler_model_info(serving_config(tmp_path)), detect_devices("cpu", 1),
                                   WorkerConfig(cpu_devices=1), BatchingConfig())  # fmt: skip
        with pytest.raises(EngineDeadError, match="no handler worker"):
            await launcher.infer(Item({}, {}))

    asyncio.run(go())
