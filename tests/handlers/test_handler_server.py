"""Server-level rules for handler models: a model registered at run time may not bring handler code,
a full queue is a 429 with Retry-After, and batches show in the metrics."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

from tests.handlers.conftest import model_dir, start_handler_server

SLOW = '''
    import time


    def handle(inputs):
        if inputs.is_empty():
            return None
        time.sleep(0.5)
        return [{"n": item.get_as_json()["n"]} for item in inputs.get_batches()]
'''


def test_a_model_registered_at_run_time_may_not_run_its_own_handler(tmp_path: Path) -> None:
    (tmp_path / "startup").mkdir()
    (tmp_path / "uploaded").mkdir()
    # The operator turned the model API on and allows any location: only the handler rule refuses.
    served = start_handler_server(model_dir(tmp_path / "startup", SLOW),
                                  server={"enable_model_api": True, "allowed_urls": (".*",)})  # fmt: skip
    marker = tmp_path / "ran"
    uploaded = model_dir(tmp_path / "uploaded", f"open({str(marker)!r}, 'w').write('ran')\n"
                                                "def handle(inputs):\n    return None\n")  # fmt: skip
    try:
        with served.client() as http:
            reply = http.post("/models", params={"url": str(uploaded), "model_name": "uploaded"})
            listed = http.get("/models").json()
    finally:
        served.stop()
    assert reply.status_code == 403
    assert "option.entryPoint" in reply.json()["error"] and "registered at run time" in reply.json()["error"]
    assert not marker.exists()
    assert "uploaded" not in str(listed)


def test_a_full_queue_answers_429_with_retry_after_and_batches_show_in_metrics(tmp_path: Path) -> None:
    server = start_handler_server(model_dir(tmp_path, SLOW), batch_size=2, max_batch_delay_ms=1, job_queue_size=2)
    together = threading.Barrier(8)

    def call(n: int) -> tuple[int, str | None]:
        with server.client() as http:
            together.wait()
            reply = http.post("/invocations", json={"n": n})
            return reply.status_code, reply.headers.get("retry-after")

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(call, range(8)))
        with server.client() as http:
            metrics = http.get("/metrics").text
    finally:
        server.stop()
    # 8 at once to one worker that takes 2 per batch and queues 2 more: some are turned away.
    codes = [code for code, _ in replies]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    assert all(retry is not None and int(retry) >= 1 for code, retry in replies if code == 429)
    batches = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("lmserve_handler_batch_size_count"))  # fmt: skip
    assert batches >= 1
