"""``Model(...).deploy(...)``: start an lmserve endpoint from Python, as a notebook does with the
SageMaker Python SDK, and get a ``Predictor`` for it.

``deploy`` runs ``lmserve serve`` as a child process in its own process group (so deleting the
endpoint stops its engines too), on loopback, waits for ``/ping``, and records the endpoint on disk.
A model that fails to load raises ``DeployError`` carrying the server's own reason.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from lmserve.errors import LMServeError
from lmserve.sdk import endpoints
from lmserve.sdk.predictor import Predictor

logger = logging.getLogger("lmserve.sdk")
# Arguments that mean something only on AWS: accepted, so notebook code runs unchanged, with one warning.
_AWS_ONLY = ("role", "image_uri", "sagemaker_session", "vpc_config", "enable_network_isolation",
             "predictor_cls", "code_location", "dependencies", "git_config")  # fmt: skip
_INSTANCE_TYPES = {"local": "cpu", "local-cpu": "cpu", "local-gpu": "cuda", "local_gpu": "cuda"}


class DeployError(LMServeError):
    """The endpoint did not become ready: the message carries the server's reason."""


class Model:
    """A model to deploy: ``model_data`` is a directory, a ``.tar.gz``, an ``s3://`` URL, a Hub id, a
    GGUF file, or ``None`` for the default model; ``env`` takes the ``OPTION_*``/``SERVING_*``
    variables the server reads."""

    def __init__(self, model_data: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                 name: str | None = None, image_uri: str | None = None, role: str | None = None,
                 **aws_only: Any) -> None:  # fmt: skip
        self.model_data = str(model_data) if model_data is not None else None
        self.env = {key: str(value) for key, value in (env or {}).items()}
        self.name = name
        given = {"image_uri": image_uri, "role": role} | aws_only
        ignored = sorted(key for key, value in given.items() if value is not None)
        unknown = [key for key in ignored if key not in _AWS_ONLY]
        if unknown:
            raise TypeError(f"Model() got unexpected keyword argument(s): {', '.join(unknown)}")
        if ignored:
            logger.warning("ignoring %s: only meaningful on AWS; lmserve deploys locally", ", ".join(ignored))
        self.endpoint: endpoints.EndpointRecord | None = None

    def deploy(self, initial_instance_count: int = 1, instance_type: str = "local",
               tensor_parallel_degree: int | None = None, endpoint_name: str | None = None,
               port: int | None = None, container_startup_health_check_timeout: float = 900,
               wait: bool = True, **aws_only: Any) -> Predictor:  # fmt: skip
        """Start the endpoint and return a ``Predictor`` for it (see the module docstring).
        ``initial_instance_count`` is the number of replicas; ``instance_type`` is ``local`` (CPU) or
        ``local-gpu`` (CUDA)."""
        if aws_only:
            logger.warning("ignoring %s: only meaningful on AWS", ", ".join(sorted(aws_only)))
        if instance_type not in _INSTANCE_TYPES:
            raise ValueError(f"instance_type {instance_type!r} is not one lmserve deploys to: use one of "
                             f"{', '.join(_INSTANCE_TYPES)}")  # fmt: skip
        if initial_instance_count < 1:
            raise ValueError(f"initial_instance_count must be at least 1, got {initial_instance_count}")
        name = endpoint_name or self.name or _default_name(self.model_data)
        if any(record.name == name for record in endpoints.list_endpoints()):
            raise DeployError(f"an endpoint called '{name}' is already running; delete it first "
                              f"(lmserve delete {name}) or choose another endpoint_name")  # fmt: skip
        port = port or endpoints.free_port()
        key = secrets.token_urlsafe(24)
        command = [sys.executable, "-m", "lmserve.cli", "serve", *([self.model_data] if self.model_data else []),
                   "--host", "127.0.0.1", "--port", str(port), "--served-name", name,
                   "--device", _INSTANCE_TYPES[instance_type], f"--api-key={key}"]  # "=": a key may start with "-"  # fmt: skip
        if tensor_parallel_degree is not None:
            command += ["--tensor-parallel-degree", str(tensor_parallel_degree)]
        if initial_instance_count > 1:
            command += ["--min-workers", str(initial_instance_count), "--max-workers", str(initial_instance_count)]
            if instance_type != "local-gpu":
                command += ["--cpu-devices", str(initial_instance_count)]
        log = tempfile.NamedTemporaryFile(prefix=f"lmserve-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        process = subprocess.Popen(command, env=os.environ | self.env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        record = endpoints.EndpointRecord(name, url, process.pid, port, self.model_data, time.time(), key)
        endpoints.save(record)
        self.endpoint = record
        if wait:
            try:
                _wait_ready(process, url, container_startup_health_check_timeout, Path(log.name))
            except BaseException:
                endpoints.stop_process_group(process.pid, grace_s=5)
                process.wait()
                endpoints.forget(name)
                raise
        return Predictor(name)


def _default_name(model_data: str | None) -> str:
    if model_data is None:
        return "lmserve-default"
    base = model_data.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar", ".gguf"):
        base = base.removesuffix(suffix)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base) or "lmserve-endpoint"


def _wait_ready(process: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    """Until ``/ping`` says 200; ``DeployError`` with the server's reason when it fails or exits."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as http:
        while True:
            code = process.poll()
            if code is not None:
                raise DeployError(f"the server exited with code {code} before it was ready: {_last_error(log)}")
            try:
                ping = http.get(f"{url}/ping")
            except httpx.TransportError:
                ping = None
            if ping is not None and ping.status_code == 200:
                return
            if ping is not None and ping.status_code == 500:
                body = ping.json()
                raise DeployError(f"the model failed to load: {body.get('error') or body}")
            if time.monotonic() > deadline:
                raise DeployError(f"the endpoint was not ready within container_startup_health_check_timeout "
                                  f"({timeout:g}s); last log line: {_last_error(log)}")  # fmt: skip
            time.sleep(0.2)


def _last_error(log: Path) -> str:
    """The server's last error line (else its last line), for an error message."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if " ERROR " in line or "error:" in line.lower()]
    return (errors or lines or ["(no output)"])[-1].strip()
