"""Model archives (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``): extracted once into the cache.

An archive is extracted into ``<cache>/archives/<sha256 of the archive>``. Extraction goes into a
temporary directory that is renamed into place, so a directory under that name is always complete and
a second call (or a second process) reuses it. Members with absolute paths, ``..`` components or links
that leave the archive are refused before anything is written.

Size: the members' declared sizes must add up to at most ``max_bytes`` (``max_extracted_bytes``), to
no more than the free space of the cache, and, past 64 MiB, to at most 100 times the archive's own
size (weights barely compress; a bigger ratio is a decompression bomb). Those checks run before
anything is written; while extracting, every file is copied through a byte budget, so a member
that yields more than its header said is cut off too. A refused or failed extraction leaves nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from tqdm.auto import tqdm

from lmserve.cache import cache_subdir
from lmserve.errors import UnsupportedModelError
from lmserve.fsutil import staged_dir, write_text_atomic
from lmserve.store.policy import DEFAULT_MAX_EXTRACTED_BYTES

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# Entries some archivers add next to the real content; they never make a model directory.
_JUNK = {"__MACOSX", ".DS_Store"}
_MAX_RATIO = 100  # extracted : archived; safetensors and tokenizer files stay far below it
_RATIO_FLOOR = 64 * 1024**2  # small archives (configs, tokenizers) may compress as well as they like
_CHUNK = 1 << 20


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


def archive_cache_dir(archive: Path) -> Path:
    """Where ``extract_archive`` puts (or has put) ``archive``: ``<cache>/archives/<sha256>``."""
    return cache_subdir("archives") / file_digest(archive)


def extract_archive(archive: Path, *, progress: bool = True, max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES) -> Path:
    """Extract ``archive`` into the cache (once) and return the model directory inside it.

    When the archive holds a single top-level directory (``tar czf m.tar.gz mymodel/``), that
    directory is the model directory; otherwise the extraction root is.

    Raises:
        UnsupportedModelError: the archive is damaged, of an unknown kind, has unsafe members, or
            extracts to more than ``max_bytes`` (see the module docstring).
    """
    final = archive_cache_dir(archive)
    if not final.is_dir():
        with staged_dir(final, already_done=final.is_dir) as tmp:  # a concurrent extraction may win
            _extract_into(archive, tmp, progress=progress, max_bytes=max_bytes)
    return _model_root(final)


def _extract_into(archive: Path, dest: Path, *, progress: bool, max_bytes: int) -> None:
    bar = {"desc": f"extract {archive.name}", "unit": "file", "disable": not progress}
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                _check_members(archive, [info.filename for info in infos])
                budget = _check_sizes(archive, dest, [i.file_size for i in infos if not i.is_dir()], max_bytes)
                for info in tqdm(infos, **bar):
                    if info.is_dir():
                        (dest / info.filename).mkdir(parents=True, exist_ok=True)
                        continue
                    with zf.open(info) as src:
                        budget = _copy_within(src, dest / info.filename, budget, archive, max_bytes)
        else:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                _check_members(archive, [m.name for m in members])
                budget = _check_sizes(archive, dest, [m.size for m in members if m.isreg()], max_bytes)
                for member in tqdm(members, **bar):
                    safe = _data_member(member, dest)
                    target = dest / safe.name
                    if safe.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    if safe.issym() or safe.islnk():
                        _clear(target)
                        if safe.issym():
                            os.symlink(safe.linkname, target)
                        else:  # a hard link shares its data: no copy, nothing against the budget
                            os.link(dest / safe.linkname, target)
                        continue
                    source = tf.extractfile(member)
                    assert source is not None, "a regular member has data"
                    budget = _copy_within(source, target, budget, archive, max_bytes)
                    if safe.mode is not None:
                        os.chmod(target, safe.mode)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise UnsupportedModelError(
            f"cannot extract model archive {archive}: {' '.join(str(exc).split())}. Check that the file "
            f"is a complete {', '.join(ARCHIVE_SUFFIXES)} archive (re-create or re-download it)."
        ) from exc


def _data_member(member: tarfile.TarInfo, dest: Path) -> tarfile.TarInfo:
    """``member`` as the "data" extraction filter (PEP 706) lets it through: never outside ``dest``,
    links only to files inside it, no special files, no owner, no set-id or group/other write bits.
    Pythons before 3.11.4 have no such filter; the same rules are then applied here. Refusals raise
    ``tarfile.TarError``."""
    if hasattr(tarfile, "data_filter"):
        return tarfile.data_filter(member, str(dest))
    root = os.path.realpath(dest)

    def inside(*parts: str) -> bool:
        return os.path.commonpath([os.path.realpath(os.path.join(root, *parts)), root]) == root

    name = member.name.lstrip("/")
    if os.path.isabs(name) or not inside(name):
        raise tarfile.TarError(f"member {member.name!r} would be written outside the extraction directory")
    if member.issym() or member.islnk():
        base = os.path.dirname(name) if member.issym() else ""
        if os.path.isabs(member.linkname) or not inside(base, member.linkname):
            raise tarfile.TarError(f"member {member.name!r} links outside the extraction directory "
                                   f"({member.linkname!r})")  # fmt: skip
    elif not (member.isreg() or member.isdir()):
        raise tarfile.TarError(f"member {member.name!r} is a special file (device or pipe)")
    safe = copy.copy(member)
    safe.name, safe.uid, safe.gid, safe.uname, safe.gname = name, 0, 0, "", ""
    if member.isreg() or member.islnk():
        safe.mode = _data_mode(member.mode)
    return safe


def _data_mode(mode: int) -> int:
    """A file's mode as the "data" filter keeps it: no set-id, sticky or group/other write bits,
    executable only if the owner may execute it, always readable and writable by the owner."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


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


def _check_sizes(archive: Path, dest: Path, sizes: list[int], max_bytes: int) -> int:
    """Refuse an archive whose declared sizes are too big; returns the byte budget to extract with."""
    total, packed = sum(sizes), archive.stat().st_size
    refuse = f"refusing to extract model archive {archive.name}: its files add up to {total} bytes"
    if total > max_bytes:
        raise UnsupportedModelError(f"{refuse}, over max_extracted_bytes ({max_bytes}); if the archive is genuine, "
                                    "raise max_extracted_bytes (SERVING_MAX_EXTRACTED_BYTES)")  # fmt: skip
    if total > _RATIO_FLOOR and total > _MAX_RATIO * packed:
        raise UnsupportedModelError(f"{refuse} from {packed} archived, more than {_MAX_RATIO}:1; model files do "
                                    "not compress that well (a decompression bomb?)")  # fmt: skip
    free = shutil.disk_usage(dest).free
    if total > free:
        raise UnsupportedModelError(f"{refuse}, more than the {free} bytes free in the lmserve cache")
    return total


def _clear(target: Path) -> None:
    """Make way for a new file or link at ``target``: its directory exists, and a link or file of the
    same name is removed (a later member of the same name replaces the earlier one, as tar does)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()


def _copy_within(source: IO[bytes], target: Path, budget: int, archive: Path, max_bytes: int) -> int:
    """Copy ``source`` into a new file ``target`` (never through a link already there) and return
    what is left of ``budget``; stop as soon as the data passes it."""
    _clear(target)
    with target.open("xb") as out:
        while chunk := source.read(_CHUNK):
            budget -= len(chunk)
            if budget < 0:
                raise UnsupportedModelError(f"refusing model archive {archive.name}: its files hold more data than "
                                            f"their headers declare (stopped at max_extracted_bytes {max_bytes} "
                                            "or the declared total)")  # fmt: skip
            out.write(chunk)
    return budget


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
