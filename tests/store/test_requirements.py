"""A model's requirements.txt: installed once into the cache, without network (a local package), or into
a virtual environment of its own (option.enable_venv)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from lmserve.errors import UnsupportedModelError
from lmserve.store import install_requirements
from lmserve.store.requirements import install_requirements_venv
from tests.handlers.test_requirements import build_wheel

PACKAGE = "lmserve_tinypkg_for_tests"


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model directory whose requirements.txt names a tiny package that sits beside it."""
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path / "cache"))
    # Build the local package with the setuptools already installed, and never look at an index.
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    package = tmp_path / "model" / "tinypkg"
    (package / PACKAGE).mkdir(parents=True)
    (package / PACKAGE / "__init__.py").write_text("VALUE = 42\n")
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{PACKAGE.replace("_", "-")}"\nversion = "1.0"\n'
    )
    (tmp_path / "model" / "requirements.txt").write_text("# the handler's own helper\n./tinypkg\n")
    return tmp_path / "model"


def test_no_requirements_file_installs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path / "cache"))

    assert install_requirements(tmp_path) is None


def test_requirements_are_installed_once_into_the_cache_and_importable(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = install_requirements(model_dir)

    assert target is not None and target.parent == tmp_path / "cache" / "pydeps"
    monkeypatch.syspath_prepend(str(target))
    monkeypatch.delitem(sys.modules, PACKAGE, raising=False)
    assert importlib.import_module(PACKAGE).VALUE == 42
    monkeypatch.delitem(sys.modules, PACKAGE)

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"pip ran again: {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert install_requirements(model_dir) == target


def test_changed_requirements_get_their_own_install(model_dir: Path) -> None:
    first = install_requirements(model_dir)
    (model_dir / "requirements.txt").write_text("./tinypkg\n# pinned differently\n")

    second = install_requirements(model_dir)

    assert second is not None and second != first
    assert (second / PACKAGE / "__init__.py").read_text() == "VALUE = 42\n"


def test_pip_failure_is_reported_with_pips_own_words(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "requirements.txt").write_text("./no-such-package-dir\n")

    with pytest.raises(UnsupportedModelError) as err:
        install_requirements(model_dir)

    message = str(err.value)
    assert str(model_dir / "requirements.txt") in message
    assert "no-such-package-dir" in message  # from pip's output
    assert list((tmp_path / "cache" / "pydeps").iterdir()) == []  # no half-finished install kept


def test_a_model_venv_gets_its_wheel_offline_when_the_server_has_no_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server installed without pip (a venv made --without-pip, a slim image): its interpreter
    # cannot run "python -m pip", so the model venv must get its installer another way.
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    venv.EnvBuilder(with_pip=False).create(tmp_path / "server-env")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "server-env" / "bin" / "python"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "requirements.txt").write_text("lmserve-wheel-probe==1.0\n")
    build_wheel(model / "requirements")

    python = install_requirements_venv(model)

    assert python is not None and python.is_relative_to(tmp_path / "cache" / "venvs")
    probe = subprocess.run([str(python), "-c", "import lmserve_wheel_probe as m; print(m.VALUE)"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert probe.stdout.strip() == "from the wheel"
