"""Model archives (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``): extracted once into the cache.

An archive is extracted into ``<cache>/archives/<sha256 of the archive>``. Extraction goes into a
temporary directory that is renamed into place, so a directory under that name is always complete and
a second call (or a second process) reuses it. Members with absolute paths, ``..`` components or links
that leave the archive are refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm.auto import tqdm

from lmserve.cache import cache_subdir
from lmserve.errors import UnsupportedModelError
from lmserve.fsutil import staged_dir, write_text_atomic

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# Entries some archivers add next to the real content; they never make a model directory.
_JUNK = {"__MACOSX", ".DS_Store"}


def is_archive_name(name: str) -> bool:
    """Whether ``name`` (a path or URI) ends in one of the archive suffixes lmserve extracts."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def file_digest(path: Path) -> str:
    """The sha256 of a file, hex. Remembered by (path, size, mtime) so big files are hashed once."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns]
    index_path = cache_subdir("digests") / "sha256.json"
    index = _read_json(index_path)
    if key in index and index[key][:2] == stamp:
        return str(index[key][2])
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    digest = sha.hexdigest()
    index = _read_json(index_path)  # re-read: another process may have added entries meanwhile
    index[key] = [*stamp, digest]
    _write_json_atomic(index_path, index)
    return digest


def extract_archive(archive: Path, *, progress: bool = True) -> Path:
    """Extract ``archive`` into the cache (once) and return the model directory inside it.

    When the archive holds a single top-level directory (``tar czf m.tar.gz mymodel/``), that
    directory is the model directory; otherwise the extraction root is.

    Raises:
        UnsupportedModelError: the archive is damaged, of an unknown kind, or has unsafe members.
    """
    final = cache_subdir("archives") / file_digest(archive)
    if not final.is_dir():
        with staged_dir(final, already_done=final.is_dir) as tmp:  # a concurrent extraction may win
            _extract_into(archive, tmp, progress=progress)
    return _model_root(final)


def _extract_into(archive: Path, dest: Path, *, progress: bool) -> None:
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
                _check_members(archive, names)
                for name in tqdm(names, desc=f"extract {archive.name}", unit="file", disable=not progress):
                    zf.extract(name, dest)
        else:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                _check_members(archive, [m.name for m in members])
                for member in tqdm(
                    members, desc=f"extract {archive.name}", unit="file", disable=not progress
                ):
                    # The "data" filter also refuses links that point outside ``dest`` and special files.
                    tf.extract(member, dest, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise UnsupportedModelError(
            f"cannot extract model archive {archive}: {' '.join(str(exc).split())}. Check that the file "
            f"is a complete {', '.join(ARCHIVE_SUFFIXES)} archive (re-create or re-download it)."
        ) from exc


def _check_members(archive: Path, names: list[str]) -> None:
    """Refuse path traversal: absolute member paths or ``..`` components."""
    for name in names:
        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
            raise UnsupportedModelError(
                f"refusing to extract model archive {archive}: member {name!r} would be written outside "
                "the extraction directory (absolute path or '..'). Re-create the archive with relative "
                "paths, e.g. 'tar czf model.tar.gz mymodel/'."
            )


def _model_root(extracted: Path) -> Path:
    entries = [p for p in extracted.iterdir() if p.name not in _JUNK and not p.name.startswith("._")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data))
