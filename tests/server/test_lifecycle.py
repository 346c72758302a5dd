"""Loading, load failure, and an engine process that dies under load."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from lmserve.workers.launcher import Backoff
from tests.server.conftest import start_server
from tests.server.metrics_util import metric


def test_port_answers_503_while_loading_then_200(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {"load_delay_s": 1.5}, wait=False)
    try:
        with server.client() as http:
            ping = http.get("/ping")
            assert ping.status_code == 503 and ping.json()["status"] == "loading"
            assert http.get("/health").status_code == 503
            busy = http.post("/invocations", json={"inputs": "hello"})
            assert busy.status_code == 503 and "loading" in busy.json()["error"]
            server.wait_for_ping(200)
            assert http.get("/health").status_code == 200
            assert http.post("/invocations", json={"inputs": "hello"}).status_code == 200
    finally:
        server.stop()


def test_load_failure_makes_ping_500_and_requests_503(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {"fail_load": True}, wait=False)
    try:
        server.wait_for_ping(500)
        with server.client() as http:
            ping = http.get("/ping").json()
            assert ping["status"] == "failed" and "fail while loading" in ping["error"]
            r = http.post("/v1/completions", json={"prompt": "hello"})
            assert r.status_code == 503 and "fail while loading" in r.json()["error"]
    finally:
        server.stop()


def test_load_timeout_fails_the_model(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {"load_delay_s": 30}, wait=False, model_loading_timeout_s=0.5)
    try:
        server.wait_for_ping(500, timeout=10)
        with server.client() as http:
            assert "model_loading_timeout" in http.get("/ping").json()["error"]
    finally:
        server.stop()


def test_killed_engine_ends_streams_with_error_then_comes_back(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {"token_delay_s": 0.02}, backoff=Backoff(first_s=0.5))
    try:
        [replica] = server.runtime.router.replicas  # type: ignore[union-attr]
        old_pid = replica.pid
        long = {"inputs": "hello", "stream": True, "parameters": {"max_new_tokens": 60}}
        with server.client() as http, http.stream("POST", "/invocations", json=long) as r:
            lines = r.iter_lines()
            assert "token" in json.loads(next(lines))
            killed = time.monotonic()
            os.kill(replica.pid, signal.SIGKILL)
            rest = [json.loads(line) for line in lines if line]
        assert time.monotonic() - killed < 3
        assert rest[-1]["code"] == 503 and "exited unexpectedly" in rest[-1]["error"]
        with server.client() as http:
            ping = http.get("/ping")
            assert ping.status_code == 503 and ping.json()["status"] == "recovering"
            r = http.post("/generate", json={"inputs": "hello"})
            assert r.status_code == 503 and "restarting" in r.json()["error"]
            assert metric(http, "lmserve_request_finished_total", finish_reason="error") == 1
            server.wait_for_ping(200, timeout=20)
            assert replica.pid != old_pid and replica.restarts == 1
            assert http.post("/generate", json={"inputs": "hello"}).status_code == 200
    finally:
        server.stop()


def test_engine_step_crash_fails_in_flight_requests_with_its_reason(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {"fail_on_word": "cat"}, backoff=Backoff(first_s=0.2))
    try:
        with server.client() as http:
            r = http.post("/invocations", json={"inputs": "the cat"})
            assert r.status_code == 503 and "crash" in r.json()["error"]
            server.wait_for_ping(200, timeout=20)  # restarted; other prompts are served
            assert http.post("/invocations", json={"inputs": "the dog"}).status_code == 200
    finally:
        server.stop()


def test_frozen_engine_is_taken_out_of_routing_failed_with_503_and_restarted(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {"token_delay_s": 0.02}, backoff=Backoff(first_s=0.2),
                          workers={"cpu_devices": 2, "heartbeat_timeout_s": 2.0})  # fmt: skip
    frozen_pid = None
    try:
        replicas = server.runtime.router.replicas  # type: ignore[union-attr]
        assert len(replicas) == 2
        long = {"inputs": "hello", "stream": True, "parameters": {"max_new_tokens": 60}}
        with server.client() as http, http.stream("POST", "/invocations", json=long) as r:
            lines = r.iter_lines()
            assert "token" in json.loads(next(lines))
            [frozen] = [replica for replica in replicas if replica.outstanding]
            frozen_pid = frozen.pid
            os.kill(frozen_pid, signal.SIGSTOP)  # type: ignore[arg-type]
            with server.client(timeout=1.5) as quick:  # the scrape must not wait on the frozen engine
                assert quick.get("/metrics").status_code == 200
            rest = [json.loads(line) for line in lines if line]
        assert rest[-1]["code"] == 503 and "stopped responding" in rest[-1]["error"]
        with server.client() as http:
            assert http.get("/ping").status_code == 200  # the other replica still serves
            for _ in range(4):  # none of these reaches the frozen replica
                assert http.post("/generate", json={"inputs": "hello"}).status_code == 200
            deadline = time.monotonic() + 30
            while frozen.pid == frozen_pid or frozen.state.value != "ready":
                assert time.monotonic() < deadline, "the frozen replica was not restarted"
                time.sleep(0.05)
            assert frozen.restarts == 1 and http.get("/metrics").status_code == 200
        try:
            os.kill(frozen_pid, 0)  # type: ignore[arg-type]
            raise AssertionError("the frozen engine process is still there")
        except ProcessLookupError:
            pass
    finally:
        if frozen_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen_pid, signal.SIGKILL)
        server.stop()
