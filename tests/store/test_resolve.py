"""resolve_model: dispatch by form, option.model_id chains, GGUF import into the cache."""

from __future__ import annotations

import re
import sys
import tarfile
import types
from pathlib import Path

import pytest

from lmserve.errors import ConfigError, ModelNotFoundError, NotAllowedError
from lmserve.store import ResolvedModel, accepted_forms, resolve_model
from lmserve.store.archive import archive_cache_dir
from lmserve.store.policy import FetchPolicy, directory_pattern


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMSERVE_CACHE", str(root))
    return root


def model_dir(path: Path, properties: str | None = None, handler: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if properties is not None:
        (path / "serving.properties").write_text(properties)
    if handler:
        (path / "model.py").write_text("def handle(inputs):\n    return None\n")
    return path


def test_local_directory_resolves_to_itself(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m", "option.dtype=fp32\n", handler=True)

    model = resolve_model(str(directory), progress=False)

    assert model == ResolvedModel(
        path=directory.resolve(),
        kind="local",
        source=str(directory.resolve()),
        properties=directory.resolve() / "serving.properties",
        has_custom_handler=True,
    )


def test_directory_without_serving_properties_or_handler(tmp_path: Path) -> None:
    model = resolve_model(model_dir(tmp_path / "m"), progress=False)  # a Path works too

    assert model.properties is None
    assert not model.has_custom_handler
    assert model.model_dir == model.path


def test_model_id_in_serving_properties_is_followed(tmp_path: Path) -> None:
    weights = model_dir(tmp_path / "weights")
    outer = model_dir(tmp_path / "outer", f"engine=Python\noption.model_id={weights}\n", handler=True)

    model = resolve_model(str(outer), progress=False)

    assert model.path == weights.resolve()
    assert model.properties == outer.resolve() / "serving.properties"
    assert model.model_dir == outer.resolve()
    assert model.has_custom_handler  # the handler sits beside the serving.properties that applies


def test_tarball_naming_a_relative_model_id(tmp_path: Path) -> None:
    src = model_dir(tmp_path / "src" / "mymodel", "# points at the weights\noption.model_id = ./weights\n")
    model_dir(src / "weights")
    archive = tmp_path / "mymodel.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="mymodel")

    model = resolve_model(str(archive), progress=False)

    assert model.properties is not None and model.properties.parent.name == "mymodel"
    assert model.path == model.properties.parent / "weights"


def test_commented_out_model_id_is_ignored(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m", "#option.model_id=s3://bucket/elsewhere\n")

    assert resolve_model(str(directory), progress=False).path == directory.resolve()


def test_model_id_naming_its_own_directory_is_not_a_cycle(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m")
    (directory / "serving.properties").write_text(f"option.model_id={directory}\n")

    assert resolve_model(str(directory), progress=False).path == directory.resolve()


def test_model_id_cycle_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    model_dir(a, f"option.model_id={b}\n")
    model_dir(b, f"option.s3url={a}\n")

    with pytest.raises(ConfigError, match="option.model_id") as err:
        resolve_model(str(a), progress=False)

    assert f"{a.resolve()} -> {b.resolve()} -> {a.resolve()}" in str(err.value)


def test_unknown_form_lists_the_accepted_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(tmp_path / "does-not-exist"), progress=False)

    message = str(err.value)
    assert "does-not-exist" in message and "nothing exists at that path" in message
    for form in accepted_forms():
        assert form in message
    assert "s3://" in message and "Hub" in message and ".gguf" in message


def test_a_plain_file_is_not_a_model(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 8)

    with pytest.raises(ModelNotFoundError, match="accepted forms"):
        resolve_model(str(weights), progress=False)


def test_conflicting_revisions_are_refused() -> None:
    with pytest.raises(ConfigError, match="revision"):
        resolve_model("org/name@v1", revision="v2", progress=False)


@pytest.fixture
def fake_import_gguf(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path, bool]]:
    """A stand-in for lmserve.store.gguf.import_gguf that writes a tiny HF-layout directory."""
    calls: list[tuple[Path, Path, bool]] = []

    def import_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
        calls.append((gguf_path, out_dir, progress))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(f'{{"from": "{gguf_path.name}"}}')
        return out_dir

    module = types.ModuleType("lmserve.store.gguf")
    module.import_gguf = import_gguf  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lmserve.store.gguf", module)
    return calls


def test_gguf_file_is_imported_into_the_cache_by_content(
    tmp_path: Path, cache: Path, fake_import_gguf: list[tuple[Path, Path, bool]]
) -> None:
    gguf = tmp_path / "tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\1" * 60)

    first = resolve_model(str(gguf), progress=False)
    assert (first.path / "config.json").read_text() == '{"from": "tiny.Q8_0.gguf"}'
    same_bytes = resolve_model(str(copy), progress=False)
    different = resolve_model(str(other), progress=False)

    assert first.kind == "gguf"
    assert first.path.parent == cache / "gguf"
    assert fake_import_gguf[0] == (gguf.resolve(), first.path, False)
    assert same_bytes.path == first.path  # so the import is reused, not redone
    assert different.path != first.path


def test_real_gguf_import_through_resolve(tmp_path: Path, cache: Path) -> None:
    from .gguf_fixtures import write_tiny_gguf  # torch and transformers: only this test pays for them

    gguf = write_tiny_gguf(tmp_path / "tiny-llama.gguf").path

    first = resolve_model(str(gguf), progress=False)
    weights_mtime = (first.path / "model.safetensors").stat().st_mtime_ns
    second = resolve_model(str(gguf), progress=False)

    assert first.kind == "gguf" and first.path.parent == cache / "gguf"
    assert '"llama"' in (first.path / "config.json").read_text()
    assert second.path == first.path
    assert (second.path / "model.safetensors").stat().st_mtime_ns == weights_mtime  # reused, not redone


# --- allowed_urls (FetchPolicy) ---------------------------------------------------------------------


def store_policy(store: Path) -> FetchPolicy:
    return FetchPolicy(allowed_urls=(directory_pattern(store),))


def test_allowed_urls_refuse_a_location_outside_them_before_fetching(tmp_path: Path) -> None:
    store, outside = tmp_path / "store", model_dir(tmp_path / "outside")
    store.mkdir()
    policy = store_policy(store)

    for url in (str(outside), f"{store}/../outside", f"file://{outside}", "org/name", "s3://bucket/m/"):
        with pytest.raises(NotAllowedError, match=f"url {re.escape(repr(url))} is not allowed"):
            resolve_model(url, progress=False, policy=policy)


def test_a_hop_out_of_the_store_is_refused_and_not_named(tmp_path: Path) -> None:
    store, outside = tmp_path / "store", model_dir(tmp_path / "outside")
    inner = model_dir(store / "inner", f"option.s3url={outside}\n")

    with pytest.raises(NotAllowedError, match="option.model_id or option.s3url") as err:
        resolve_model(str(inner), progress=False, policy=store_policy(store))

    assert str(outside) not in str(err.value) and repr(str(inner)) in str(err.value)


def test_a_hop_inside_a_tarball_is_refused_and_its_extraction_removed(tmp_path: Path, cache: Path) -> None:
    store, outside = tmp_path / "store", model_dir(tmp_path / "outside")
    store.mkdir()
    archive = store / "pointer.tar.gz"
    properties = tmp_path / "serving.properties"
    properties.write_text(f"option.model_id={outside}\n")
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(properties, arcname="serving.properties")

    with pytest.raises(NotAllowedError, match="serving.properties names another location"):
        resolve_model(str(archive), progress=False, policy=store_policy(store))

    assert list((cache / "archives").iterdir()) == []
    allowed = FetchPolicy(allowed_urls=(directory_pattern(store), directory_pattern(outside)))
    model = resolve_model(str(archive), progress=False, policy=allowed)
    assert model.path == outside.resolve() and model.created == (archive_cache_dir(archive),)
    assert resolve_model(str(archive), progress=False, policy=allowed).created == ()  # reused, not made


def test_a_link_out_of_the_store_is_matched_as_what_it_points_at(tmp_path: Path) -> None:
    store, outside = tmp_path / "store", model_dir(tmp_path / "outside")
    store.mkdir()
    (store / "link").symlink_to(outside)

    with pytest.raises(NotAllowedError):
        resolve_model(str(store / "link"), progress=False, policy=store_policy(store))
