"""Which models count: unnamed requests, concurrent registrations of one name, and /ping once every
model is gone. Through HTTP, over the fake engine."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL_NAME, LiveServer, start_server

KEY = "registry-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def served(tiny_model_dir: Path) -> Iterator[LiveServer]:
    # A one-second load makes "still loading" observable: the fake engine sleeps before it is ready.
    server = start_server(tiny_model_dir, {"token_delay_s": 0.005, "load_delay_s": 1.0}, graceful_shutdown_s=0.5,
                          server={"api_key": KEY, "allowed_urls": (".*",)})  # fmt: skip
    yield server
    server.stop()


def status_of(http: httpx.Client, name: str) -> str:
    return http.get(f"/models/{name}", headers=AUTH).json()["status"]


def test_a_failed_background_registration_never_shadows_the_served_model(served: LiveServer, tmp_path: Path) -> None:
    with served.client() as http:
        r = http.post("/models", headers=AUTH, params={"url": str(tmp_path / "nothing-here"), "model_name": "broken",
                                                       "synchronous": "false"})  # fmt: skip
        assert r.status_code == 202
        deadline = time.monotonic() + 30
        while status_of(http, "broken") != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        listed = http.get("/models", headers=AUTH).json()["models"]
        assert {m["model_name"]: m["status"] for m in listed} == {MODEL_NAME: "ready", "broken": "failed"}
        assert http.get("/ping").status_code == 200
        answer = http.post("/invocations", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
        assert answer.status_code == 200, answer.text
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2})  # fmt: skip
        assert chat.status_code == 200, chat.text


def test_a_registration_still_loading_never_shadows_the_served_model(served: LiveServer,
                                                                     tiny_model_dir: Path) -> None:
    with served.client() as http:
        r = http.post("/models", headers=AUTH, params={"url": str(tiny_model_dir), "model_name": "later",
                                                       "synchronous": "false"})  # fmt: skip
        assert r.status_code == 202
        assert status_of(http, "later") == "loading"  # its engine sleeps a second before it is ready
        answer = http.post("/invocations", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
        assert answer.status_code == 200, answer.text
        assert status_of(http, "later") == "loading", "the check above must have run while it loaded"
        deadline = time.monotonic() + 30
        while status_of(http, "later") != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Once it has loaded it counts: an unnamed request is now ambiguous.
        ambiguous = http.post("/invocations", json={"inputs": "hello"})
        assert ambiguous.status_code == 400 and ambiguous.json()["field"] == "model_name"


def test_concurrent_registrations_of_one_name_give_one_model_and_409s(served: LiveServer,
                                                                      tiny_model_dir: Path) -> None:
    def register() -> httpx.Response:
        with served.client() as http:
            return http.post("/models", headers=AUTH, params={"url": str(tiny_model_dir), "model_name": "twin",
                                                              "synchronous": "false"})  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda _: register(), range(3)))
    assert codes == [202, 409, 409]
    with served.client() as http:
        names = [m["model_name"] for m in http.get("/models", headers=AUTH).json()["models"]]
        assert names.count("twin") == 1
        assert [rt.name for rt in served.registry.models].count("twin") == 1  # one runtime, one engine
        assert http.delete("/models/twin", headers=AUTH).status_code == 200


def test_ping_is_503_once_every_model_is_unregistered(served: LiveServer) -> None:
    with served.client() as http:
        assert http.get("/ping").status_code == 200
        assert http.delete(f"/models/{MODEL_NAME}", headers=AUTH).status_code == 200
        ping = http.get("/ping")
        assert ping.status_code == 503, ping.text
        assert ping.json()["status"] == "no model"
        assert http.post("/invocations", json={"inputs": "hello"}).status_code == 404
