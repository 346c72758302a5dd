"""Hub ids, resolved offline from a Hub cache laid out on disk exactly as huggingface_hub writes it."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects

from lmserve.errors import ModelNotFoundError
from lmserve.store import resolve_model
from lmserve.store.hub import is_hub_id

REPO = "tiny-org/tiny-llama"
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"\0" * 64,
    "tokenizer.json": b"{}",
    "serving.properties": b"engine=Python\n",
    "model.py": b"def handle(inputs):\n    return None\n",
}


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], ref: str = "main") -> Path:
    """Write ``models--org--name/{blobs,snapshots/<commit>,refs/<ref>}`` and return the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path / "lmserve"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path / "hf-hub"


def test_the_hand_made_cache_is_one_huggingface_hub_recognises(hub_cache: Path) -> None:
    snapshot = add_to_hub_cache(hub_cache, REPO, FILES)

    (repo,) = huggingface_hub.scan_cache_dir(hub_cache).repos
    (revision,) = repo.revisions

    assert repo.repo_id == REPO and revision.commit_hash == snapshot.name
    assert revision.refs == frozenset({"main"})
    assert {f.file_name for f in revision.files} == set(FILES)


def test_offline_hub_id_resolves_from_the_cache(hub_cache: Path) -> None:
    snapshot = add_to_hub_cache(hub_cache, REPO, FILES)

    model = resolve_model(REPO, progress=False)

    assert model.kind == "hub"
    assert model.source == REPO
    assert model.path == snapshot
    assert (model.path / "config.json").read_bytes() == FILES["config.json"]
    assert model.properties == snapshot / "serving.properties"
    assert model.has_custom_handler


def test_hf_home_locates_the_cache(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snapshot = add_to_hub_cache(tmp_path / "hf-home" / "hub", REPO, FILES)

    assert resolve_model(REPO, progress=False).path == snapshot


def test_revision_selects_the_snapshot(hub_cache: Path) -> None:
    main = add_to_hub_cache(hub_cache, REPO, FILES)
    tagged = add_to_hub_cache(hub_cache, REPO, {**FILES, "config.json": b'{"v": 1}'}, ref="v1")

    assert resolve_model(REPO, progress=False).path == main
    assert resolve_model(f"{REPO}@v1", progress=False).path == tagged
    assert resolve_model(REPO, revision="v1", progress=False).path == tagged
    assert resolve_model(f"{REPO}@{tagged.name}", progress=False).path == tagged


def test_offline_and_not_cached_says_so(hub_cache: Path) -> None:
    add_to_hub_cache(hub_cache, REPO, FILES)

    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("tiny-org/not-downloaded", progress=False)

    message = str(err.value)
    assert "'tiny-org/not-downloaded'" in message
    assert "Offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert str(hub_cache) in message


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode, with HF_ENDPOINT on a loopback port nobody listens on: every request is refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")


def test_unreachable_hub_falls_back_to_the_cache(hub_cache: Path, unreachable_hub: None) -> None:
    snapshot = add_to_hub_cache(hub_cache, REPO, FILES)

    assert resolve_model(REPO, progress=False).path == snapshot


def test_unreachable_hub_and_not_cached_says_offline_mode_was_off(
    hub_cache: Path, unreachable_hub: None
) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("tiny-org/not-downloaded", progress=False)

    assert "'tiny-org/not-downloaded'" in str(err.value)
    assert "the Hub could not be reached" in str(err.value)
    assert "Offline mode is off" in str(err.value)


@pytest.mark.parametrize(
    "repo_files, fetched",
    [
        (
            ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin"],
            {"model-00001-of-00002.safetensors", "model.safetensors.index.json"},
        ),
        (
            ["pytorch_model.bin", "pytorch_model.bin.index.json"],
            {"pytorch_model.bin", "pytorch_model.bin.index.json"},
        ),
    ],
)
def test_online_fetch_takes_one_weight_format_and_the_serving_files(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, repo_files: list[str], fetched: set[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    serving_files = [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "tokenizer.model", "merges.txt", "vocab.json", "serving.properties", "model.py",
        "requirements.txt", "chat_template.jinja",
    ]  # fmt: skip
    repo = [*repo_files, *serving_files, "README.md", ".gitattributes", "images/logo.png", "model.onnx"]
    asked: dict[str, Any] = {}

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        asked.update(kwargs, repo_id=repo_id)
        return str(add_to_hub_cache(hub_cache, repo_id, {"config.json": b"{}"}))

    def model_info(self: huggingface_hub.HfApi, repo_id: str, revision: str | None = None) -> Any:
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in repo])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    resolve_model(REPO, revision="v2", progress=False)

    chosen = set(filter_repo_objects(repo, allow_patterns=asked["allow_patterns"]))
    assert chosen == fetched | set(serving_files)
    assert asked["repo_id"] == REPO and asked["revision"] == "v2"
    assert asked["cache_dir"] == hub_cache and asked["local_files_only"] is False


def test_local_directory_wins_over_a_hub_id_of_the_same_name(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tiny-org" / "tiny-llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    assert resolve_model(REPO, progress=False).kind == "local"


@pytest.mark.parametrize("name", ["org/name", "org/name@main", "Org-1/name_2.5@refs/pr/3"])
def test_hub_id_forms(name: str) -> None:
    assert is_hub_id(name)


@pytest.mark.parametrize(
    "name", ["name", "org/name/extra", "../org/name", "org/..", "org--x/name", "s3://b/k"]
)
def test_not_hub_ids(name: str) -> None:
    assert not is_hub_id(name)
