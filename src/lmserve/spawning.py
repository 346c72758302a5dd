"""Starting "spawn" processes, one of them under another Python interpreter, without changing the
interpreter of any other.

``multiprocessing`` keeps one interpreter for every spawn of a process (``set_executable``). A
custom handler with ``enable_venv`` runs under its model's virtual environment; set for its worker
and left so, every later spawn of the server (tensor-parallel ranks, engine workers, other models'
handlers) ran under that model's environment too, with its installed packages. Every spawn goes
through ``start_spawned``, which holds a lock while another interpreter is swapped in.
"""

from __future__ import annotations

import multiprocessing.spawn
import threading
from multiprocessing.process import BaseProcess

_lock = threading.Lock()


def start_spawned(process: BaseProcess, python: str | None = None) -> None:
    """Start ``process`` (of the "spawn" context); with ``python``, under that interpreter only."""
    with _lock:
        if python is None:
            process.start()
            return
        previous = multiprocessing.spawn.get_executable()
        multiprocessing.spawn.set_executable(python)
        try:
            process.start()
        finally:
            multiprocessing.spawn.set_executable(previous)
