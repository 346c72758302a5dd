"""``lmserve serve`` as a user runs it, stopped with SIGTERM: drain, then exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import FAKE_FACTORY

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream_lines(url: str, max_new_tokens: int, out: list[dict], first_line: threading.Event) -> None:
    body = {"inputs": "hello world", "stream": True, "parameters": {"max_new_tokens": max_new_tokens}}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/invocations", json=body) as r:
        for line in r.iter_lines():
            if line:
                out.append(json.loads(line))
                first_line.set()


@pytest.mark.slow
def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_0(tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), SERVING_GRACEFUL_SHUTDOWN_S="1.5")
    command = [sys.executable, "-m", "lmserve.cli", "serve", str(tiny_model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--n-positions", "64", "--block-size", "4", "--engine-factory", FAKE_FACTORY,
               "--engine-options", json.dumps({"token_delay_s": 0.05})]  # fmt: skip
    with log.open("w") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/ping").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        short, long = [], []
        started = [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=stream_lines, args=(url, 8, short, started[0])),
                   threading.Thread(target=stream_lines, args=(url, 60, long, started[1]))]  # fmt: skip
        for thread in threads:
            thread.start()
        assert all(event.wait(10) for event in started)

        os.killpg(proc.pid, signal.SIGTERM)  # as supervisors that signal the whole group do
        time.sleep(0.2)
        assert httpx.get(f"{url}/ping").status_code == 503
        refused = httpx.post(f"{url}/invocations", json={"inputs": "hello"})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]

        for thread in threads:
            thread.join(10)
        assert short[-1]["generated_text"] is not None and len(short) == 8  # finished in the grace period
        assert long[-1]["code"] == 503 and "shut down" in long[-1]["error"]  # aborted after it, visibly
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    for phase in ("resolve", "config", "tokenizer", "engine load"):
        assert re.search(rf"{phase}: done in \d+\.\d+s", text), phase
    engine_pid = int(re.search(r"engine process (\d+) started", text).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(engine_pid, 0)
