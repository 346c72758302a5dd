"""A real HTTP server (uvicorn on a free loopback port) in front of the fake engine in its own process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from lmserve.config.settings import EngineConfig, ModelSpec, ServerConfig, ServingConfig, WorkerConfig
from lmserve.server.app import create_app
from lmserve.server.registry import ModelRegistry
from lmserve.server.runtime import LoadPlan, ModelRuntime
from lmserve.workers.launcher import Backoff
from tests.server.fake_engine import FakeEngine
from tests.server.tiny_tokenizer import build_tiny_tokenizer

FAKE_FACTORY = f"{FakeEngine.__module__}:FakeEngine"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 64


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-model"))


def serving_config(model_dir: Path, *, job_queue_size: int = 16, predict_timeout_s: float = 10.0,
                   max_request_bytes: int = 64 * 1024, queue_full_status: int = 429,
                   model_loading_timeout_s: float = 60.0, graceful_shutdown_s: float = 5.0,
                   engine: dict[str, Any] | None = None, workers: dict[str, Any] | None = None,
                   server: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> ServingConfig:
    """A test configuration; one replica (``cpu_devices=1``) unless ``workers`` says otherwise."""
    engine_fields = {"max_model_len": MAX_MODEL_LEN, "block_size": 4, "max_num_seqs": 8} | (engine or {})
    return ServingConfig(
        model=ModelSpec(model_id=str(model_dir), name=MODEL_NAME, **(model or {})),
        engine=EngineConfig(model=str(model_dir), served_name=MODEL_NAME, **engine_fields),
        workers=WorkerConfig(job_queue_size=job_queue_size, predict_timeout_s=predict_timeout_s,
                             model_loading_timeout_s=model_loading_timeout_s, **({"cpu_devices": 1} | (workers or {}))),
        server=ServerConfig(host="127.0.0.1", port=0, max_request_bytes=max_request_bytes,
                            queue_full_status=queue_full_status, graceful_shutdown_s=graceful_shutdown_s,
                            **(server or {})),
    )  # fmt: skip


@dataclass
class LiveServer:
    """uvicorn serving the app in a thread; ``url`` is its base URL, ``runtime`` the startup model."""

    registry: ModelRegistry
    server: uvicorn.Server
    thread: threading.Thread
    url: str = ""

    @property
    def runtime(self) -> ModelRuntime:
        return self.registry.models[0]

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)

    def wait_for_ping(self, status: int = 200, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as http:
            while (code := http.get("/ping").status_code) != status:
                assert time.monotonic() < deadline, f"/ping stayed {code}, wanted {status}"
                time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(model_dir: Path, engine_options: dict[str, Any] | None = None, wait: bool = True,
                 engine_factory: str = FAKE_FACTORY, backoff: Backoff | None = None, **config: Any) -> LiveServer:
    plan = LoadPlan(serving_config(model_dir, **config), resolve=False, engine_factory=engine_factory,
                    engine_options=engine_options or {}, restart_backoff=backoff or Backoff())  # fmt: skip
    registry = ModelRegistry.serving(plan)
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
    if wait:
        live.wait_for_ping(200, timeout=config.get("model_loading_timeout_s", 60.0))
    return live


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server shared by a test module: quick tokens (2 ms per engine step), roomy limits."""
    server = start_server(tiny_model_dir, {"token_delay_s": 0.002})
    yield server
    server.stop()


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client() as client:
        yield client
