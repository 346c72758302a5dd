"""Publishing files and directories whole, and locks between processes.

Everything lmserve writes into its cache (conversions, extracted archives, imported models, installed
requirements, packed weights) is built under a temporary name beside its destination and renamed
into place when complete, so a reader, another process or the next start after a crash sees either
nothing or the finished result. The temporary names start with ``.<name>.tmp-``, which lets an owner
that holds the lock find and remove what an interrupted writer left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock


def staging_name(final: Path, tag: str = "tmp") -> Path:
    """A fresh hidden sibling of ``final``, unique to this process and call."""
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def staged_dir(final: Path, *, replace: bool = False,
               already_done: Callable[[], bool] | None = None) -> Iterator[Path]:
    """Yield an empty directory to build ``final`` in; rename it to ``final`` when the block succeeds.

    The directory is removed whatever happens (it is gone already once renamed). An existing
    ``final`` makes the rename fail unless ``replace`` (the old one is swapped out, then deleted: each
    step leaves the old or the new), or ``already_done()`` says a concurrent writer finished it first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(final)
    tmp.mkdir()
    try:
        yield tmp
        if replace and final.exists():
            old = staging_name(final, "replaced")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, final)
        except OSError:
            if already_done is None or not already_done():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``final``'s content to; it replaces ``final`` atomically when
    the block succeeds and is removed when it fails."""
    tmp = staging_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` in one step: readers see the old or the new file."""
    with staged_file(path) as tmp:
        tmp.write_text(text)


def file_lock(path: Path) -> FileLock:
    """An exclusive lock between processes (and threads) on ``path``, created if needed; use as a
    context manager. The lock file itself stays, so that waiters all lock the same file."""
    return FileLock(str(path))
