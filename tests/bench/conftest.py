"""Fixtures for bench tests: a tiny real model served by ``lmserve serve`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmserve.bench.launch import ServeConfig, ServerProcess

# The servers of these tests run the pure-torch CPU path: bench measures HTTP streams, and a compile
# of the CPU kernels would only make the first start slow.
SERVER_ENV = {"LMSERVE_CPU_KERNELS": "0"}
TINY_SERVE_ARGS = ("--n-positions", "64")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.tiny_models import make_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path, "llama", tokenizer_dir)
    return path


@pytest.fixture(scope="module")
def llama_server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch_module: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(str(tiny_llama), ServeConfig(max_rolling_batch_size=4), "cpu", log,
                       extra_args=TINY_SERVE_ARGS) as server:  # fmt: skip
        server.wait_ready(300)
        yield server


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SERVER_ENV.items():
            mp.setenv(key, value)
        yield mp


def run_cli(*args: str, cores: set[int] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``lmserve ARGS`` in a subprocess (this checkout's sources), optionally pinned to ``cores``."""
    env = dict(os.environ, **SERVER_ENV)
    return subprocess.run([sys.executable, "-m", "lmserve.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)  # fmt: skip


def bench_json(url: str, out: Path, *args: str, cores: set[int] | None = None) -> dict[str, Any]:
    proc = run_cli("bench", url, "--no-progress", "--output-json", str(out), *args, cores=cores)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(out.read_text())
