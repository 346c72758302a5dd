"""A model's own Python dependencies: ``requirements.txt`` beside ``model.py``.

Installed once per distinct file content into ``<cache>/pydeps/<sha256>`` with ``pip --target``; the
caller puts that directory first on ``sys.path``. The install goes into a temporary directory that is
renamed into place, so a directory under that name is always a finished install.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from lmserve.cache import cache_subdir
from lmserve.errors import UnsupportedModelError
from lmserve.fsutil import staged_dir

REQUIREMENTS = "requirements.txt"
WHEELS = "requirements"  # a folder of wheels beside requirements.txt: installs from it, offline
_DONE = ".lmserve-installed"
_PIP_TAIL_LINES = 20


def install_requirements(model_dir: Path) -> Path | None:
    """Install ``model_dir/requirements.txt`` (once) and return the directory to add to ``sys.path``.

    Returns None when the model has no requirements.txt. Relative paths inside the file are taken
    relative to ``model_dir``, as a user writing it next to ``model.py`` would expect.

    Raises:
        UnsupportedModelError: pip failed; the message holds pip's last lines.
    """
    requirements = model_dir / REQUIREMENTS
    if not requirements.is_file():
        return None
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    target = cache_subdir("pydeps") / digest
    if (target / _DONE).is_file():
        return target
    # A concurrent install that won the rename is fine.
    with staged_dir(target, already_done=(target / _DONE).is_file) as tmp:
        _pip_install(requirements, [sys.executable, "-m", "pip"], target=tmp)
        (tmp / _DONE).write_text(str(requirements.resolve()) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # a leftover without the marker is unfinished
    return target


def install_requirements_venv(model_dir: Path) -> Path | None:
    """Install ``model_dir/requirements.txt`` (once per content) into a virtual environment of its
    own, ``<cache>/venvs/<sha256>``, and return that environment's ``python``; None without the file.

    The environment is created without pip; this interpreter's pip installs into it when it has
    one, else pip is bootstrapped into the environment from the standard library (see
    ``_venv_pip``), so a server installed without pip can still use ``option.enable_venv``.

    Raises:
        UnsupportedModelError: pip failed; the message holds pip's last lines.
    """
    requirements = model_dir / REQUIREMENTS
    if not requirements.is_file():
        return None
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    target = cache_subdir("venvs") / digest
    python = target / "bin" / "python"
    if (target / _DONE).is_file():
        return python
    # Built beside its final name and renamed into place (the interpreter finds its environment
    # from where it is; the scripts pip writes would keep the staging path, and none is used).
    with staged_dir(target, already_done=(target / _DONE).is_file) as tmp:
        venv.EnvBuilder(with_pip=False, symlinks=True).create(tmp)
        _pip_install(requirements, _venv_pip(tmp / "bin" / "python"))
        (tmp / _DONE).write_text(str(requirements.resolve()) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # a leftover without the marker is unfinished
    return python


def venv_site_packages(python: Path) -> Path:
    """The ``site-packages`` folder of the virtual environment whose interpreter is ``python``."""
    lib = python.parent.parent / "lib"
    return next(lib.glob("python3*/site-packages"), lib / "site-packages")


def _venv_pip(python: Path) -> list[str]:
    """The pip command line that installs into the virtual environment of ``python``.

    This interpreter's pip with ``--python`` (pip 22.3 or later) when it has one: nothing is added to
    the environment. Otherwise (a server installed without pip, or with an older one) pip is put into
    the environment by ``ensurepip``, from the wheel the standard library bundles: offline.

    Raises:
        UnsupportedModelError: neither works; the message says what to install.
    """
    if _pip_version([sys.executable, "-m", "pip"]) >= (22, 3):
        return [sys.executable, "-m", "pip", "--python", str(python)]
    proc = subprocess.run([str(python), "-m", "ensurepip", "--default-pip"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-_PIP_TAIL_LINES:])
        raise UnsupportedModelError(
            f"option.enable_venv=true needs pip: {sys.executable} has no pip 22.3 or later, and the new "
            f"environment could not bootstrap one with ensurepip (on Debian and Ubuntu it is in the "
            f"python3-venv package). Install pip beside lmserve, or set option.enable_venv=false. "
            f"ensurepip said:\n{tail}"
        )
    return [str(python), "-m", "pip"]


def _pip_version(pip: list[str]) -> tuple[int, ...]:
    """The version of the pip that ``pip`` runs, or () when it does not run."""
    proc = subprocess.run([*pip, "--version"], capture_output=True, text=True, check=False)
    words = proc.stdout.split()  # "pip 24.0 from ... (python 3.11)"
    if proc.returncode != 0 or len(words) < 2 or words[0] != "pip":
        return ()
    return tuple(int(part) for part in words[1].split(".")[:2] if part.isdigit())


def _pip_install(requirements: Path, pip: list[str], target: Path | None = None) -> None:
    """``pip install -r requirements`` with the command line ``pip``, into ``target`` (``--target``)
    when given. A ``requirements/`` folder beside the file is the only source then (wheels shipped
    with the model install offline)."""
    cmd = [*pip, "install", "--disable-pip-version-check", "--no-input"]
    cmd += ["--target", str(target)] if target is not None else []
    wheels = requirements.parent / WHEELS
    if wheels.is_dir():
        cmd += ["--no-index", "--find-links", str(wheels.resolve())]
    cmd += ["-r", str(requirements.resolve())]
    proc = subprocess.run(cmd, cwd=requirements.parent, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-_PIP_TAIL_LINES:])
        raise UnsupportedModelError(
            f"installing the model's {requirements} failed (pip exit code {proc.returncode}). Fix the "
            f"file or make its packages reachable (index, proxy, or local paths). pip said:\n{tail}"
        )
