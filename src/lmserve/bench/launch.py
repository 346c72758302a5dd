"""One lmserve configuration as a server subprocess: its flags, start, readiness, usage, stop.

The server is ``lmserve serve`` in its own process group, optionally pinned to a set of cores (the
load generator then pins itself to the others), its log in the sweep's directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from lmserve.errors import LMServeError


class ServerStartError(LMServeError):
    """A configuration's server exited or did not become ready; the message holds its log's tail."""


@dataclass(frozen=True)
class ServeConfig:
    """One point of the sweep. ``None`` leaves lmserve's default."""

    tensor_parallel_degree: int = 1
    replicas: int = 1
    max_rolling_batch_size: int | None = None
    max_rolling_batch_prefill_tokens: int | None = None
    dtype: str | None = None
    batch_size: int | None = None
    max_batch_delay: float | None = None

    @property
    def key(self) -> str:
        parts = [f"tp{self.tensor_parallel_degree}", f"r{self.replicas}"]
        for prefix, value in (("b", self.max_rolling_batch_size), ("pt", self.max_rolling_batch_prefill_tokens),
                              ("", self.dtype), ("bs", self.batch_size), ("d", self.max_batch_delay)):  # fmt: skip
            if value is not None:
                parts.append(f"{prefix}{value:g}" if isinstance(value, float) else f"{prefix}{value}")
        return "-".join(parts)

    @property
    def max_in_flight(self) -> int:
        """Requests the configuration decodes at once: a full batch on every replica."""
        return self.replicas * (self.max_rolling_batch_size or 64)

    def properties(self, model: str | None, device: str) -> dict[str, str]:
        """The ``serving.properties`` keys of this configuration (no model id for the default model)."""
        props = {"option.model_id": model} if model else {}
        props |= {"option.tensor_parallel_degree": str(self.tensor_parallel_degree),
                  "minWorkers": str(self.replicas), "maxWorkers": str(self.replicas)}  # fmt: skip
        if device == "cpu":
            props["option.cpu_devices"] = str(self.replicas * self.tensor_parallel_degree)
        optional = {"option.max_rolling_batch_size": self.max_rolling_batch_size,
                    "option.max_rolling_batch_prefill_tokens": self.max_rolling_batch_prefill_tokens,
                    "option.dtype": self.dtype, "batch_size": self.batch_size,
                    "max_batch_delay": self.max_batch_delay}  # fmt: skip
        props |= {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in optional.items() if v is not None}
        return props

    def serve_flags(self, device: str) -> list[str]:
        flags = ["--tensor-parallel-degree", str(self.tensor_parallel_degree),
                 "--min-workers", str(self.replicas), "--max-workers", str(self.replicas)]  # fmt: skip
        if device == "cpu":
            flags += ["--cpu-devices", str(self.replicas * self.tensor_parallel_degree)]
        for flag, value in (("--max-batch-size", self.max_rolling_batch_size),
                            ("--max-batched-tokens", self.max_rolling_batch_prefill_tokens), ("--dtype", self.dtype),
                            ("--batch-size", self.batch_size), ("--max-batch-delay", self.max_batch_delay)):  # fmt: skip
            if value is not None:
                flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return flags

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``lmserve serve MODEL`` for one configuration; use as a context manager."""

    def __init__(self, model: str | None, config: ServeConfig, device: str, log_path: Path,
                 cores: set[int] | None = None, extra_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "lmserve.cli", "serve", *([model] if model else []), "--host", "127.0.0.1",
                        "--port", str(self.port), "--log-level", "warning", "--device", device,
                        *config.serve_flags(device), *extra_args]  # fmt: skip
        self.log_path, self.cores = log_path, cores
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            cores = self.cores
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ``/ping`` answered 200; raises ``ServerStartError`` on exit or timeout."""
        assert self.proc is not None
        start = time.monotonic()
        # One client for every poll: a new one each time builds a TLS context, ~60 ms of CPU.
        with httpx.Client(base_url=self.url, timeout=5, verify=False) as client:
            while time.monotonic() - start < timeout_s:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get("/ping").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise ServerStartError(f"the server was not ready within {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_mib(self) -> float:
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
