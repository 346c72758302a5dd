"""The management API over the fake engine: register, describe, pick by name, scale, unregister."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmserve.workers.launcher import Backoff
from tests.server.conftest import MODEL_NAME, LiveServer, start_server

SECOND = "second"
KEY = "operator-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def served(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server whose management API is on through its key (so errors keep their detail), allowing
    any location: these tests are about the API, test_model_api_security.py about its limits."""
    server = start_server(tiny_model_dir, {"token_delay_s": 0.01}, graceful_shutdown_s=0.5,
                          workers={"cpu_devices": 2, "max_workers": 1},
                          server={"api_key": KEY, "allowed_urls": (".*",)})  # fmt: skip
    yield server
    server.stop()


def wait_for_status(http: httpx.Client, name: str, status: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (model := http.get(f"/models/{name}").json())["status"] != status:
        assert time.monotonic() < deadline, f"{name} stayed {model['status']}, wanted {status}"
        time.sleep(0.05)
    return model


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_register_describe_pick_and_unregister(served: LiveServer, tiny_model_dir: Path) -> None:
    with served.client(headers=ADMIN) as http:
        r = http.post("/models", params={"url": str(tiny_model_dir), "model_name": SECOND, "max_worker": 1})
        assert r.status_code == 200, r.text
        described = r.json()["model"]
        assert described["status"] == "ready" and not described["loaded_at_startup"]
        assert described["max_workers"] == 1 and described["max_model_len"] == 128
        [replica] = described["replicas"]
        assert replica["state"] == "ready" and isinstance(replica["pid"], int)
        assert {m["model_name"] for m in http.get("/models").json()["models"]} == {MODEL_NAME, SECOND}

        ambiguous = http.post("/invocations", json={"inputs": "hello"})
        assert ambiguous.status_code == 400 and ambiguous.json()["field"] == "model_name"
        assert MODEL_NAME in ambiguous.json()["error"] and SECOND in ambiguous.json()["error"]
        unknown = http.post("/invocations", params={"model_name": "nope"}, json={"inputs": "hello"})
        assert unknown.status_code == 404 and SECOND in unknown.json()["error"]
        for call in (lambda: http.post("/invocations", params={"model_name": SECOND}, json={"inputs": "hi"}),
                     lambda: http.post(f"/predictions/{SECOND}", json={"inputs": "hi"}),
                     lambda: http.post("/generate", params={"model_name": SECOND}, json={"inputs": "hi"}),
                     lambda: http.post("/v1/completions", json={"model": SECOND, "prompt": "hi"})):  # fmt: skip
            assert call().status_code == 200
        assert http.get(f"/models/{SECOND}").json()["replicas"][0]["requests_total"] == 4
        assert {card["id"] for card in http.get("/v1/models").json()["data"]} == {MODEL_NAME, SECOND}

        assert http.post("/models", params={"url": str(tiny_model_dir), "model_name": SECOND}).status_code == 409
        assert http.delete(f"/models/{SECOND}").status_code == 200
        assert gone(replica["pid"])
        assert http.get(f"/models/{SECOND}").status_code == 404
        assert http.post("/invocations", json={"inputs": "hello"}).status_code == 200  # one model again


def test_asynchronous_registration_answers_202_and_loads_in_the_background(served: LiveServer,
                                                                           tiny_model_dir: Path) -> None:
    with served.client(headers=ADMIN) as http:
        r = http.post("/models", params={"url": str(tiny_model_dir), "model_name": SECOND, "synchronous": "false"})
        assert r.status_code == 202 and r.headers["Location"] == f"/models/{SECOND}"
        wait_for_status(http, SECOND, "ready")
        http.delete(f"/models/{SECOND}")


def test_a_registration_that_cannot_load_is_refused_and_not_kept(served: LiveServer, tmp_path: Path) -> None:
    with served.client(headers=ADMIN) as http:
        missing = http.post("/models", params={"url": str(tmp_path / "nothing-here"), "model_name": "x"})
        assert missing.status_code == 404 and "cannot find a model" in missing.json()["error"]
        bad_name = http.post("/models", params={"url": str(tmp_path), "model_name": "a b"})
        assert bad_name.status_code == 400 and bad_name.json()["field"] == "model_name"
        assert [m["model_name"] for m in http.get("/models").json()["models"]] == [MODEL_NAME]
        assert http.get("/ping").status_code == 200
        later = http.post("/models", params={"url": str(tmp_path / "nothing-here"), "model_name": "x",
                                             "synchronous": "false"})  # fmt: skip
        assert later.status_code == 202
        failed = wait_for_status(http, "x", "failed")  # kept, so that its error can be read
        assert "cannot find a model" in failed["error"]
        assert http.get("/ping").status_code == 200  # a registration that never loaded does not count
        assert http.delete("/models/x").status_code == 200


def stream_tokens(url: str, out: list[dict], started: threading.Event) -> None:
    body = {"inputs": "hello", "stream": True, "parameters": {"max_new_tokens": 60}}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/invocations", json=body) as r:
        for line in r.iter_lines():
            if line:
                out.append(json.loads(line))
                started.set()


def test_scale_up_then_down_drains_the_removed_replica(served: LiveServer) -> None:
    with served.client(headers=ADMIN) as http:
        up = http.put(f"/models/{MODEL_NAME}", params={"min_worker": 2, "max_worker": 2})
        assert up.status_code == 200, up.text
        replicas = up.json()["model"]["replicas"]
        assert [r["state"] for r in replicas] == ["ready", "ready"] and replicas[0]["pid"] != replicas[1]["pid"]
        assert up.json()["model"]["min_workers"] == 2

        outputs: list[list[dict]] = [[], []]
        events = [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=stream_tokens, args=(served.url, outputs[i], events[i])) for i in range(2)]
        for thread in threads:
            thread.start()
        assert all(event.wait(10) for event in events)
        assert [r["outstanding"] for r in http.get(f"/models/{MODEL_NAME}").json()["replicas"]] == [1, 1]
        down = http.put(f"/models/{MODEL_NAME}", params={"max_worker": 1})  # min_worker follows it down
        assert down.status_code == 200 and len(down.json()["model"]["replicas"]) == 1
        assert down.json()["model"]["min_workers"] == 1
        for thread in threads:
            thread.join(10)
        ends = sorted(("error" in out[-1], out[-1].get("error", "")) for out in outputs)
        assert ends[0][0] is False and ends[1][0] is True and "scale-down" in ends[1][1]
        assert gone(replicas[1]["pid"])
        too_many = http.put(f"/models/{MODEL_NAME}", params={"min_worker": 3})
        assert too_many.status_code == 400 and "at most 2 replica" in too_many.json()["error"]
        assert http.put(f"/models/{MODEL_NAME}", params={"min_worker": 2, "max_worker": 1}).status_code == 400


def test_ping_stays_200_while_one_of_two_replicas_restarts(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {"load_delay_s": 1.0}, workers={"cpu_devices": 2},
                          backoff=Backoff(first_s=0.3), model_loading_timeout_s=30)  # fmt: skip
    try:
        with server.client() as http:
            before = http.get(f"/models/{MODEL_NAME}").json()["replicas"]
            os.kill(before[0]["pid"], signal.SIGKILL)
            time.sleep(0.5)
            ping = http.get("/ping")
            assert ping.status_code == 200 and ping.json()["models"][MODEL_NAME]["replicas_ready"] == 1
            states = [r["state"] for r in http.get(f"/models/{MODEL_NAME}").json()["replicas"]]
            assert states[0] in ("restarting", "loading") and states[1] == "ready"
            assert http.post("/invocations", json={"inputs": "hello"}).status_code == 200
            after = wait_for_status(http, MODEL_NAME, "ready")
            deadline = time.monotonic() + 20
            while after["replicas"][0]["state"] != "ready":
                assert time.monotonic() < deadline
                time.sleep(0.1)
                after = http.get(f"/models/{MODEL_NAME}").json()
            assert after["replicas"][0]["restarts"] == 1 and after["replicas"][0]["pid"] != before[0]["pid"]
    finally:
        server.stop()


def test_failed_restarts_past_retry_threshold_make_ping_500(tiny_model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "fail"
    server = start_server(tiny_model_dir, {"fail_load_if_exists": str(marker)}, backoff=Backoff(first_s=0.05),
                          workers={"retry_threshold": 2})  # fmt: skip
    try:
        with server.client() as http:
            marker.touch()
            os.kill(http.get(f"/models/{MODEL_NAME}").json()["replicas"][0]["pid"], signal.SIGKILL)
            server.wait_for_ping(500, timeout=20)
            ping = http.get("/ping").json()
            assert ping["status"] == "failed" and "retry_threshold 2" in ping["error"]
            model = http.get(f"/models/{MODEL_NAME}").json()
            assert model["status"] == "failed" and model["replicas"][0]["consecutive_failures"] == 2
            r = http.post("/invocations", json={"inputs": "hello"})
            assert r.status_code == 503 and "the model failed" in r.json()["error"]
    finally:
        server.stop()
