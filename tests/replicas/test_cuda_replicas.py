"""On a CUDA machine: the frontend counts the GPUs without importing torch, and a replica's engine
process runs on its block of GPUs, given through CUDA_VISIBLE_DEVICES (that the engine process
applies its placement's environment is tested on the CPU, in tests/workers/test_launcher.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.config.settings import EngineConfig, WorkerConfig
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import ConfigError
from lmserve.server.runtime import DEFAULT_ENGINE_FACTORY
from lmserve.workers.launcher import Launcher
from lmserve.workers.messages import EngineSpec
from lmserve.workers.placement import detect_devices, visible_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_cuda_replica_gets_its_gpus_and_answers_like_the_offline_engine(tmp_path: Path,
                                                                             tokenizer_dir: Path) -> None:
    from lmserve import LLM
    from tests.tiny_models import make_tiny_model

    make_tiny_model(tmp_path, "llama", tokenizer_dir)
    devices = detect_devices("auto", None)
    assert devices.kind == "cuda" and devices.gpu_ids == visible_gpus() and devices.count >= 1
    config = EngineConfig(model=str(tmp_path), dtype="fp32", max_model_len=128, kv_cache_tokens=2048)
    launcher = Launcher("tiny", EngineSpec(DEFAULT_ENGINE_FACTORY, config), devices,
                        WorkerConfig(model_loading_timeout_s=300))  # fmt: skip
    prompt, params = [5, 17, 33, 42, 7, 99], SamplingParams(max_new_tokens=12, ignore_eos=True)
    try:
        info = await launcher.start(1)
        [replica] = launcher.replicas
        assert info.device.startswith("cuda")
        assert replica.placement.env["CUDA_VISIBLE_DEVICES"] == devices.gpu_ids[0]  # the engine applying it:
        served = [d async for d in launcher.router.submit(prompt, params, "r1")]
        with pytest.raises(ConfigError, match="at most"):
            launcher.check_count(devices.count + 1)
    finally:
        await launcher.stop()
    offline = LLM(tmp_path, dtype="fp32", max_model_len=128, kv_cache_tokens=2048).generate([prompt], params)[0]
    assert [t for d in served for t in d.token_ids] == offline.token_ids
