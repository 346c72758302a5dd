"""Waiting for a server process the test started to answer ``/ping`` with 200."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout: float,
                     describe: Callable[[], str] = lambda: "") -> None:  # fmt: skip
    """Until ``url``/ping is 200; fails at once if ``process`` exits, and after ``timeout`` seconds.
    ``describe()`` (e.g. the server's log) goes into the failure message."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/ping").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, f"the server exited ({process.returncode}): {describe()}"
        assert time.monotonic() < deadline, f"the server was not ready within {timeout:g}s: {describe()}"
        time.sleep(0.2)
