"""A custom handler's requirements.txt is installed before its worker starts: from the wheels in a
requirements/ folder beside it (offline), into the shared cache or, with enable_venv, a model venv."""

from __future__ import annotations

import base64
import hashlib
import multiprocessing.spawn
import zipfile
from pathlib import Path

import pytest

from tests.handlers.conftest import model_dir, start_handler_server

MODEL = '''
    import sys

    import lmserve_wheel_probe


    def handle(inputs):
        if inputs.is_empty():
            return None
        return {"value": lmserve_wheel_probe.VALUE, "module": lmserve_wheel_probe.__file__,
                "python": sys.executable}
'''


def build_wheel(folder: Path) -> None:
    """A pure-Python wheel ``lmserve_wheel_probe`` 1.0, written by hand (no build backend, no network)."""
    folder.mkdir()
    files = {"lmserve_wheel_probe/__init__.py": "VALUE = 'from the wheel'\n",
             "lmserve_wheel_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: lmserve-wheel-probe\nVersion: 1.0\n",
             "lmserve_wheel_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                          "Tag: py3-none-any\n"}  # fmt: skip
    record = ""
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(text.encode())}\n"
    record += "lmserve_wheel_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / "lmserve_wheel_probe-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in (files | {"lmserve_wheel_probe-1.0.dist-info/RECORD": record}).items():
            wheel.writestr(name, text)


@pytest.fixture
def probe_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    path = model_dir(tmp_path / "model", MODEL, **{"requirements.txt": "lmserve-wheel-probe==1.0\n"})
    build_wheel(path / "requirements")
    return path


@pytest.mark.parametrize("enable_venv", [False, True], ids=["shared-cache", "model-venv"])
def test_requirements_install_from_the_wheel_folder(probe_model: Path, tmp_path: Path, enable_venv: bool) -> None:
    interpreter = multiprocessing.spawn.get_executable()
    server = start_handler_server(probe_model, model={"enable_venv": enable_venv}, model_loading_timeout_s=300)
    try:
        with server.client() as http:
            answer = http.post("/invocations", json={}).json()
    finally:
        server.stop()
    assert answer["value"] == "from the wheel"
    cache = tmp_path / "cache"
    assert Path(answer["module"]).is_relative_to(cache / ("venvs" if enable_venv else "pydeps"))
    assert Path(answer["python"]).is_relative_to(cache / "venvs") == enable_venv
    # The venv was this worker's only: later spawns (tensor-parallel ranks, engines) keep lmserve's.
    assert multiprocessing.spawn.get_executable() == interpreter
