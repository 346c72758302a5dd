"""LMI configurations at start: tensor_parallel_degree=max is resolved before placement, and
fail_fast stops the server when the model fails to load."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmserve.config import TENSOR_PARALLEL_MAX, load_serving_config
from lmserve.server.runtime import LoadPlan, ModelRuntime
from tests.server.conftest import FAKE_FACTORY, MODEL_NAME, start_server
from tests.server.test_shutdown import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_start_with_tensor_parallel_max_runs_one_rank_on_the_cpu(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, engine={"tensor_parallel_degree": TENSOR_PARALLEL_MAX, "device": "cpu"})
    try:
        assert server.runtime.config.engine.tensor_parallel_degree == 1
        with server.client() as http:
            model = http.get(f"/models/{MODEL_NAME}").json()
            assert model["tensor_parallel_degree"] == 1
            assert http.post("/invocations", json={"inputs": "hello"}).status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_fail_fast_exits_with_status_1_when_the_model_fails_to_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
               SERVING_FAIL_FAST="true")  # fmt: skip
    command = [sys.executable, "-m", "lmserve.cli", "serve", str(tiny_model_dir), "--host", "127.0.0.1",
               "--port", str(free_port()), "--engine-factory", FAKE_FACTORY,
               "--engine-options", json.dumps({"fail_load": True})]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "fail_fast" in done.stderr and "fail while loading" in done.stderr


def test_model_py_entry_point_without_the_file_is_refused_not_served_by_the_default(tiny_model_dir: Path,
                                                                                    tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "serving.properties").write_text("option.entryPoint=model.py\noption.rolling_batch=auto\n")
    config = load_serving_config(str(model), env={})
    runtime = ModelRuntime(LoadPlan(config, model_arg=str(model), resolve=True, engine_factory=FAKE_FACTORY))

    async def load_then_stop() -> None:
        try:
            await runtime.load()
        finally:
            await runtime.shutdown()

    asyncio.run(load_then_stop())
    assert runtime.error is not None
    assert "option.entryPoint names 'model.py'" in str(runtime.error) and "not a file" in str(runtime.error)
