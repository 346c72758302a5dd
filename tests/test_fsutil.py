"""Publishing whole: a destination is missing, old or complete, never half-written."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lmserve.fsutil import file_lock, staged_dir, staged_file, write_text_atomic


def test_a_staged_dir_appears_complete_and_leaves_no_temporary(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "model"
    with staged_dir(final) as tmp:
        (tmp / "weights").write_text("w")
        assert not final.exists()
    assert (final / "weights").read_text() == "w"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"), staged_dir(final) as tmp:
        (tmp / "weights").write_text("w")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_dir_is_kept_unless_replaced_or_already_done(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("o")
    with pytest.raises(OSError), staged_dir(final) as tmp:
        (tmp / "new").write_text("n")
    with staged_dir(final, already_done=lambda: (final / "old").is_file()) as tmp:
        (tmp / "new").write_text("n")  # another writer finished first: theirs stays
    assert [p.name for p in final.iterdir()] == ["old"]
    with staged_dir(final, replace=True) as tmp:
        (tmp / "new").write_text("n")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in final.iterdir()] == ["new"]


def test_a_staged_file_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), staged_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["index.json"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_a_file_lock_excludes_other_holders(tmp_path: Path) -> None:
    inside: list[str] = []

    def hold(name: str) -> None:
        with file_lock(tmp_path / ".lock"):
            inside.append(f"{name} in")
            time.sleep(0.05)
            inside.append(f"{name} out")

    threads = [threading.Thread(target=hold, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inside in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
