"""Endpoints started by the SDK, recorded on disk so that another process (``lmserve endpoints``,
``lmserve delete NAME``, ``Predictor("NAME")``) can find and stop them.

A record is ``<cache>/endpoints/<name>.json``: the URL, the server's process id (the leader of its
own process group, so stopping the group stops its engines too) and what was deployed. A record
whose process is gone is removed whenever records are listed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmserve.cache import cache_subdir
from lmserve.errors import LMServeError


class EndpointNotFoundError(LMServeError):
    """No running endpoint of that name was started by the SDK on this machine."""


@dataclass(frozen=True)
class EndpointRecord:
    name: str
    url: str
    pid: int
    port: int
    model_data: str | None
    created: float
    api_key: str | None = None  # the management key the SDK gave the server (the file is private)

    def alive(self) -> bool:
        return process_alive(self.pid)


def records_dir() -> Path:
    return cache_subdir("endpoints")


def save(record: EndpointRecord) -> None:
    path = records_dir() / f"{record.name}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds a key: owner only
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(record), out)
    tmp.replace(path)


def forget(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (records_dir() / f"{name}.json").unlink()


def list_endpoints() -> list[EndpointRecord]:
    """Every recorded endpoint whose server still runs; the records of dead ones are removed."""
    alive = []
    for path in sorted(records_dir().glob("*.json")):
        try:
            record = EndpointRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: not ours to trust
            continue
        if record.alive():
            alive.append(record)
        else:
            path.unlink(missing_ok=True)
    return alive


def find(name: str) -> EndpointRecord:
    """The running endpoint called ``name``; ``EndpointNotFoundError`` naming the running ones if none."""
    running = list_endpoints()
    for record in running:
        if record.name == name:
            return record
    names = ", ".join(r.name for r in running) or "none"
    raise EndpointNotFoundError(f"no running endpoint called '{name}' (running: {names}); "
                                "'lmserve endpoints' lists them")  # fmt: skip


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


def stop_process_group(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group (it drains and exits), SIGKILL what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Members that are only zombies waiting for their parent count as gone.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
