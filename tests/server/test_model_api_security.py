"""The management API's limits: registered models never run their own code without the operator's
consent, locations outside allowed_urls are refused at every hop, archives are bounded and cleaned
up, and a caller without a key learns nothing about the server's files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.server.conftest import MODEL_NAME, start_server
from tests.server.tiny_tokenizer import build_tiny_tokenizer

KEY = "operator-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}


def evil_model(directory: Path, marker: Path) -> Path:
    """A model whose serving.properties asks for trust_remote_code and whose tokenizer config names
    a class in a .py file beside it, which writes ``marker`` when imported."""
    build_tiny_tokenizer(directory)
    (directory / "serving.properties").write_text("option.trust_remote_code=true\n")
    (directory / "evil_tok.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def names(http) -> list[str]:  # type: ignore[no-untyped-def]
    return [m["model_name"] for m in http.get("/models").json()["models"]]


@pytest.mark.parametrize("synchronous", ["true", "false"])
def test_a_registered_model_cannot_turn_on_trust_remote_code_from_its_own_files(
        tiny_model_dir: Path, tmp_path: Path, synchronous: str) -> None:  # fmt: skip
    marker = tmp_path / "code-ran"
    evil = evil_model(tmp_path / "store" / "evil", marker)
    server = start_server(tiny_model_dir, server={"enable_model_api": True, "model_store": str(tmp_path / "store")})
    try:
        with server.client() as http:
            r = http.post("/models", params={"url": str(evil), "model_name": "evil", "synchronous": synchronous})
            if synchronous == "true":
                assert r.status_code == 403, r.text
                assert "trust_remote_code_urls" in r.json()["error"] and str(evil) in r.json()["error"]
                assert names(http) == [MODEL_NAME]
            else:
                assert r.status_code == 202
                failed = wait_for(http, "evil", "failed")
                assert "trust_remote_code_urls" in failed["error"]
        assert not marker.exists()
    finally:
        server.stop()


def wait_for(http, name: str, status: str) -> dict:  # type: ignore[no-untyped-def]
    from tests.server.test_management import wait_for_status

    return wait_for_status(http, name, status)


def test_allowed_urls_default_to_the_model_store_and_hold_at_every_hop(tiny_model_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path / "cache"))
    store, outside = tmp_path / "store", build_tiny_tokenizer(tmp_path / "outside")
    inside = build_tiny_tokenizer(store / "inside")
    hop_dir = store / "hop"
    hop_dir.mkdir()
    (hop_dir / "serving.properties").write_text(f"option.model_id={outside}\n")
    hop_tar = tar_gz(store / "hop.tar.gz", {"serving.properties": f"option.model_id={outside}\n".encode()})
    server = start_server(tiny_model_dir, server={"enable_model_api": True, "model_store": str(store)})
    try:
        with server.client() as http:
            for url in (str(outside), f"{store}/../outside", "org/some-model", "s3://bucket/model/", "/etc/shadow",
                        "/no/such/file", str(hop_dir), str(hop_tar)):  # fmt: skip
                r = http.post("/models", params={"url": url, "model_name": "m"})
                assert r.status_code == 403, (url, r.text)
                assert f"url {url!r} is not allowed" in r.json()["error"]
                if url in (str(hop_dir), str(hop_tar)):  # the hop is a file's content: not shown
                    assert str(outside) not in r.json()["error"] and "option.model_id" in r.json()["error"]
            assert names(http) == [MODEL_NAME]
            assert not any((tmp_path / "cache" / "archives").iterdir())  # the refused tarball left nothing
            ok = http.post("/models", params={"url": str(inside), "model_name": "inside"})
            assert ok.status_code == 200, ok.text
    finally:
        server.stop()


def test_without_a_key_failures_reveal_no_paths_nor_loader_messages(tiny_model_dir: Path, tmp_path: Path) -> None:
    no_tokenizer = tmp_path / "config-only"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    server = start_server(tiny_model_dir, server={"enable_model_api": True, "allowed_urls": (".*",)})
    try:
        with server.client() as http:
            replies = {url: http.post("/models", params={"url": url, "model_name": "m"})
                       for url in ("/etc/shadow", "/no/such/file", str(no_tokenizer))}  # fmt: skip
            for url, r in replies.items():
                assert r.status_code == 400, r.text
                assert r.json()["error"] == (f"cannot serve a model from url {url!r}: nothing usable was found there, "
                                             "or it could not be loaded (the server log says why)")  # fmt: skip
            later = http.post("/models", params={"url": str(no_tokenizer), "model_name": "m", "synchronous": "false"})
            assert later.status_code == 202
            failed = wait_for(http, "m", "failed")
            assert failed["error"] == replies[str(no_tokenizer)].json()["error"]  # no loader message
    finally:
        server.stop()


def test_descriptions_show_cache_paths_relative_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMSERVE_CACHE", str(cache))
    model = build_tiny_tokenizer(cache / "models" / "tiny")
    server = start_server(model)
    try:
        with server.client() as http:
            listed = http.get("/models").json()["models"]
            assert [m["model_url"] for m in listed] == ["<cache>/models/tiny"]
            assert http.get(f"/models/{MODEL_NAME}").json()["model_url"] == "<cache>/models/tiny"
            assert str(cache) not in http.get(f"/models/{MODEL_NAME}").text
    finally:
        server.stop()


def test_an_archive_bomb_is_refused_and_a_failed_load_leaves_nothing_in_the_cache(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    store.mkdir()
    bomb = tar_gz(store / "bomb.tar.gz", {"model/config.json": b"{}", "model/weights.bin": bytes(4 * 1024**2)})
    unloadable = tar_gz(store / "unloadable.tar.gz", {"model/config.json": b"{}"})  # no tokenizer
    server = start_server(tiny_model_dir, server={"api_key": KEY, "model_store": str(store),
                                                  "max_extracted_bytes": 1024**2})  # fmt: skip
    try:
        with server.client(headers=ADMIN) as http:
            r = http.post("/models", params={"url": str(bomb), "model_name": "bomb"})
            assert r.status_code == 400 and "max_extracted_bytes" in r.json()["error"], r.text
            r = http.post("/models", params={"url": str(unloadable), "model_name": "unloadable"})
            assert r.status_code == 400 and "tokenizer" in r.json()["error"], r.text  # the operator sees why
            assert names(http) == [MODEL_NAME]
        assert list((tmp_path / "cache" / "archives").iterdir()) == []
    finally:
        server.stop()
