"""Model archives: extracted once into the cache, safely."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from lmserve.errors import UnsupportedModelError
from lmserve.store import resolve_model
from lmserve.store.archive import extract_archive
from lmserve.store.policy import FetchPolicy


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMSERVE_CACHE", str(root))
    return root


def make_model_dir(parent: Path, name: str = "mymodel") -> Path:
    model = parent / name
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "serving.properties").write_text("engine=Python\noption.dtype=fp32\n")
    return model


def tar_with(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_tar_gz_with_one_top_level_directory_resolves_to_that_directory(tmp_path: Path, cache: Path) -> None:
    make_model_dir(tmp_path / "src")
    archive = tmp_path / "mymodel.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:  # like `tar czvf mymodel.tar.gz mymodel/`
        tf.add(tmp_path / "src" / "mymodel", arcname="mymodel")

    model = resolve_model(str(archive), progress=False)

    assert model.kind == "archive"
    assert model.path.name == "mymodel"
    assert model.path.is_relative_to(cache / "archives")
    assert (model.path / "config.json").read_text() == '{"model_type": "llama"}'
    assert model.properties == model.path / "serving.properties"
    assert not model.has_custom_handler


@pytest.mark.parametrize("suffix, mode", [(".tgz", "w:gz"), (".tar", "w")])
def test_flat_tar_resolves_to_the_extraction_root(tmp_path: Path, suffix: str, mode: str) -> None:
    members = {"config.json": b"{}", "model.py": b"def handle(inputs):\n    return None\n"}
    archive = tar_with(tmp_path / f"flat{suffix}", members, mode)

    model = resolve_model(str(archive), progress=False)

    assert sorted(p.name for p in model.path.iterdir()) == ["config.json", "model.py"]
    assert model.has_custom_handler


def test_zip_is_extracted(tmp_path: Path) -> None:
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("weights/config.json", "{}")
        zf.writestr("weights/serving.properties", "option.dtype=fp16\n")

    model = resolve_model(str(archive), progress=False)

    assert model.path.name == "weights"
    assert model.properties is not None
    assert model.properties.read_text() == "option.dtype=fp16\n"


def test_second_resolve_reuses_the_extraction(tmp_path: Path) -> None:
    archive = tar_with(tmp_path / "m.tar.gz", {"m/config.json": b"{}"})
    first = resolve_model(str(archive), progress=False)
    (first.path / "touched-after-extraction").write_text("x")  # would vanish on a re-extraction

    second = resolve_model(str(archive), progress=False)

    assert second.path == first.path
    assert (second.path / "touched-after-extraction").exists()


def test_a_changed_archive_is_extracted_again(tmp_path: Path) -> None:
    archive = tmp_path / "m.tar.gz"
    first = resolve_model(str(tar_with(archive, {"m/config.json": b"{}"})), progress=False)
    second = resolve_model(str(tar_with(archive, {"m/config.json": b'{"v": 2}'})), progress=False)

    assert second.path != first.path
    assert (second.path / "config.json").read_text() == '{"v": 2}'


@pytest.mark.parametrize("evil", ["../escaped.txt", "m/../../escaped.txt", "/tmp/escaped.txt"])
def test_tar_path_traversal_is_refused(tmp_path: Path, cache: Path, evil: str) -> None:
    archive = tar_with(tmp_path / "evil.tar.gz", {"m/config.json": b"{}", evil: b"pwned"})

    with pytest.raises(UnsupportedModelError, match="outside the extraction directory") as err:
        extract_archive(archive, progress=False)

    assert repr(evil) in str(err.value)
    assert not (cache / "escaped.txt").exists() and not (cache / "archives" / "escaped.txt").exists()
    assert [p.name for p in (cache / "archives").iterdir() if not p.name.startswith(".")] == []


def test_zip_path_traversal_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("../../escaped.txt", "pwned")

    with pytest.raises(UnsupportedModelError, match=r"'\.\./\.\./escaped\.txt'"):
        resolve_model(str(archive), progress=False)


@pytest.fixture(params=["stdlib filter", "own rules"])
def tar_rules(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Python's "data" extraction filter where this Python has one, and the rules archive.py applies
    itself where it has none (before 3.11.4, e.g. Debian 12's 3.11.2): the same refusals either way."""
    if request.param == "own rules":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile.data_filter")
    return str(request.param)


def tar_entries(path: Path, entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in entries:
            body = (data or {}).get(info.name)
            if body is not None:
                info.size = len(body)
            tf.addfile(info, io.BytesIO(body) if body is not None else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


def test_links_inside_the_archive_are_kept_and_modes_are_tamed(tmp_path: Path, tar_rules: str) -> None:
    """A Hub cache snapshot links its files to blobs: links that stay inside are extracted as links.
    Set-id bits and group/other write permission are dropped; owner read/write is always granted."""
    archive = tar_entries(tmp_path / "hub.tar.gz", [
        entry("m", tarfile.DIRTYPE, mode=0o777),
        entry("m/blobs/abc", mode=0o4777),
        entry("m/config.json", tarfile.SYMTYPE, "blobs/abc"),
        entry("m/same.json", tarfile.LNKTYPE, "m/blobs/abc"),
        entry("m/run.sh", mode=0o500),
    ], {"m/blobs/abc": b'{"model_type": "llama"}', "m/run.sh": b"#!/bin/sh\n"})  # fmt: skip

    root = extract_archive(archive, progress=False)

    assert root.name == "m" and (root / "config.json").is_symlink()
    assert (root / "config.json").read_text() == (root / "same.json").read_text() == '{"model_type": "llama"}'
    assert (root / "blobs" / "abc").stat().st_mode & 0o7777 == 0o755
    assert (root / "run.sh").stat().st_mode & 0o7777 == 0o700


@pytest.mark.parametrize("evil", [
    [entry("m/config.json", tarfile.SYMTYPE, "/etc/passwd")],
    [entry("m/config.json", tarfile.SYMTYPE, "../../outside")],
    [entry("m/config.json", tarfile.LNKTYPE, "../outside")],
    [entry("m/config.json", tarfile.LNKTYPE, "/etc/passwd")],
    [entry("m/fifo", tarfile.FIFOTYPE)],
    [entry("m/disk", tarfile.BLKTYPE)],
], ids=["absolute-symlink", "symlink-up", "hardlink-up", "absolute-hardlink", "fifo", "device"])
def test_tar_members_leaving_the_archive_or_special_are_refused(
        tmp_path: Path, cache: Path, tar_rules: str, evil: list[tarfile.TarInfo]) -> None:  # fmt: skip
    archive = tar_entries(tmp_path / "evil.tar.gz", [entry("m/ok.txt"), *evil])

    with pytest.raises(UnsupportedModelError, match="cannot extract"):
        extract_archive(archive, progress=False)

    assert leftovers(cache) == []
    assert not (tmp_path / "outside").exists()


def test_tar_symlink_out_of_the_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        link = tarfile.TarInfo("m/config.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)

    with pytest.raises(UnsupportedModelError, match="cannot extract"):
        resolve_model(str(archive), progress=False)


def test_damaged_archive_gives_a_clear_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really gzip")

    with pytest.raises(UnsupportedModelError, match=r"broken\.tar\.gz.*re-create or re-download"):
        resolve_model(str(archive), progress=False)


class Zeros(io.RawIOBase):
    """``size`` zero bytes, read in chunks: a huge member without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def zero_bomb(path: Path, size: int) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("m/config.json"), io.BytesIO(b""))
        info = tarfile.TarInfo("m/weights.bin")
        info.size = size
        tf.addfile(info, io.BufferedReader(Zeros(size)))
    return path


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "archives").iterdir())


def test_an_archive_declaring_more_than_max_bytes_is_refused_before_writing(tmp_path: Path, cache: Path) -> None:
    archive = zero_bomb(tmp_path / "bomb.tar.gz", 3 * 1024**2)

    with pytest.raises(UnsupportedModelError, match=r"add up to 3145728 bytes, over max_extracted_bytes \(1048576\)"):
        resolve_model(str(archive), progress=False, policy=FetchPolicy(max_extracted_bytes=1024**2))

    assert leftovers(cache) == []


def test_a_decompression_bomb_is_refused_by_its_ratio_under_the_default_limit(tmp_path: Path, cache: Path) -> None:
    archive = zero_bomb(tmp_path / "bomb.tar.gz", 80 * 1024**2)  # about 80 KB on disk
    assert archive.stat().st_size < 1024**2

    with pytest.raises(UnsupportedModelError, match="more than 100:1"):
        extract_archive(archive, progress=False)

    assert leftovers(cache) == []


def test_a_member_yielding_more_than_declared_is_cut_off_while_extracting(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # Python's readers keep to the headers; another reader (or a future bug) might not. Stand in for
    # one that lies: the member declares 10 bytes and yields two megabytes.
    archive = tar_with(tmp_path / "liar.tar.gz", {"m/config.json": b"{}", "m/weights.bin": b"0123456789"})
    real_extractfile = tarfile.TarFile.extractfile

    def lying(self, member):  # type: ignore[no-untyped-def]
        if str(getattr(member, "name", member)).endswith("weights.bin"):
            return io.BufferedReader(Zeros(2 * 1024**2))
        return real_extractfile(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", lying)

    with pytest.raises(UnsupportedModelError, match="more data than their headers declare"):
        extract_archive(archive, progress=False, max_bytes=1024**2)

    assert leftovers(cache) == []


def test_a_zip_declaring_more_than_max_bytes_is_refused(tmp_path: Path, cache: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/weights.bin", bytes(2 * 1024**2))

    with pytest.raises(UnsupportedModelError, match="over max_extracted_bytes"):
        extract_archive(archive, progress=False, max_bytes=1024**2)

    assert leftovers(cache) == []
    assert (resolve_model(str(archive), progress=False).path / "weights.bin").stat().st_size == 2 * 1024**2
