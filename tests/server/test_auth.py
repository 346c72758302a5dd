"""The API key: the management API needs it, inference routes only with protect_inference; a refused
request changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.conftest import MODEL_NAME, start_server

KEY = "s3cret-token"
GOOD = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}])
def test_management_without_the_token_is_401_and_changes_nothing(tiny_model_dir: Path,
                                                                 headers: dict[str, str]) -> None:
    server = start_server(tiny_model_dir, server={"api_key": KEY})
    try:
        with server.client(headers=headers) as http:
            for method, path, params in (("GET", "/models", None), ("GET", f"/models/{MODEL_NAME}", None),
                                         ("POST", "/models", {"url": str(tiny_model_dir), "model_name": "two"}),
                                         ("PUT", f"/models/{MODEL_NAME}", {"min_worker": 2}),
                                         ("DELETE", f"/models/{MODEL_NAME}", None)):  # fmt: skip
                r = http.request(method, path, params=params)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (method, path)
                assert KEY not in r.text
            assert http.post("/invocations", json={"inputs": "hello"}).status_code == 200  # inference is open
            assert http.get("/ping").status_code == 200
        with server.client(headers=GOOD) as http:
            model = http.get(f"/models/{MODEL_NAME}").json()
            assert len(model["replicas"]) == 1 and model["min_workers"] is None
            assert [m["model_name"] for m in http.get("/models").json()["models"]] == [MODEL_NAME]
    finally:
        server.stop()


def test_protect_inference_needs_the_token_on_inference_routes_but_not_on_health(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, server={"api_key": KEY, "protect_inference": True})
    try:
        with server.client() as http:
            for path, body in (("/invocations", {"inputs": "hello"}), ("/generate", {"inputs": "hello"}),
                               ("/v1/completions", {"prompt": "hello"})):  # fmt: skip
                assert http.post(path, json=body).status_code == 401
            assert http.get("/v1/models").status_code == 401
            assert http.get("/ping").status_code == 200 and http.get("/health").status_code == 200
            assert http.get("/metrics").status_code == 200
        with server.client(headers=GOOD) as http:
            assert http.post("/invocations", json={"inputs": "hello"}).status_code == 200
            assert http.get("/models").status_code == 200
    finally:
        server.stop()


def test_without_a_key_models_can_be_read_but_not_changed(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir)
    try:
        with server.client() as http:
            assert http.get("/models").status_code == 200
            for method, path, params in (("POST", "/models", {"url": str(tiny_model_dir), "model_name": "two"}),
                                         ("PUT", f"/models/{MODEL_NAME}", {"min_worker": 2}),
                                         ("DELETE", f"/models/{MODEL_NAME}", None)):  # fmt: skip
                r = http.request(method, path, params=params)
                assert r.status_code == 403 and "--enable-model-api" in r.json()["error"], (method, r.text)
            assert [m["model_name"] for m in http.get("/models").json()["models"]] == [MODEL_NAME]
            assert len(http.get(f"/models/{MODEL_NAME}").json()["replicas"]) == 1
            assert http.post("/invocations", json={"inputs": "hello"}).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("key", ["clé-ключ-鍵", "plain-ascii-key"])
def test_a_key_with_any_characters_matches_itself_sent_as_utf8(tiny_model_dir: Path, key: str) -> None:
    server = start_server(tiny_model_dir, server={"api_key": key})
    try:
        with server.client() as http:
            right = http.get("/models", headers={"Authorization": f"Bearer {key}".encode()})
            assert right.status_code == 200, right.text
            wrong = http.get("/models", headers={"Authorization": f"Bearer {key}x".encode()})
            assert wrong.status_code == 401
    finally:
        server.stop()
