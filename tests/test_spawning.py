"""A worker started under another interpreter (a model's venv) leaves every later spawn on lmserve's own."""

from __future__ import annotations

import multiprocessing
import multiprocessing.spawn
import os
import sys
from multiprocessing.connection import Connection
from pathlib import Path

from lmserve.spawning import start_spawned


def report_interpreter(conn: Connection) -> None:
    conn.send(sys.executable)
    conn.close()


def interpreter_of_a_spawn(python: str | None) -> str:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=report_interpreter, args=(theirs,))
    start_spawned(process, python)
    try:
        assert ours.poll(60), "the spawned process never answered"
        return str(ours.recv())
    finally:
        process.join(30)


def test_one_worker_runs_under_another_python_and_the_next_spawn_does_not(tmp_path: Path) -> None:
    other = tmp_path / "venv-python"  # another path to the same interpreter, as a venv's python is
    os.symlink(sys.executable, other)
    before = multiprocessing.spawn.get_executable()
    assert interpreter_of_a_spawn(str(other)) == str(other)
    assert multiprocessing.spawn.get_executable() == before
    assert interpreter_of_a_spawn(None) != str(other)
