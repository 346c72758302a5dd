"""``lmserve serve`` with a custom handler, stopped with SIGTERM: requests still waiting in the
dynamic batcher are served within the grace period, the worker stops, the server exits 0."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.handlers.conftest import model_dir
from tests.server.test_shutdown import REPO_ROOT, free_port

SLOW = '''
    import time


    def handle(inputs):
        if inputs.is_empty():
            return None
        time.sleep(0.6)
        return {"n": inputs.get_as_json()["n"]}
'''


@pytest.mark.slow
def test_sigterm_serves_the_queued_requests_before_exiting(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    path = model_dir(tmp_path / "model", SLOW, "batch_size=1\n")
    port, log = free_port(), tmp_path / "serve.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
               SERVING_GRACEFUL_SHUTDOWN_S="20")  # fmt: skip
    command = [sys.executable, "-m", "lmserve.cli", "serve", str(path), "--host", "127.0.0.1", "--port", str(port)]
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
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = [pool.submit(httpx.post, f"{url}/invocations", json={"n": n}, timeout=30) for n in range(3)]
            time.sleep(0.3)  # one request runs, two wait in the batcher (0.6 s each, one at a time)
            os.killpg(proc.pid, signal.SIGTERM)
            answers = [reply.result() for reply in replies]
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert sorted(a.json()["n"] for a in answers) == [0, 1, 2]
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    worker = int(re.search(r"handler worker (\d+) started", log.read_text()).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
