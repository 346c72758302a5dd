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
from pathlib import Path

from lmserve.cache import cache_subdir
from lmserve.errors import UnsupportedModelError
from lmserve.fsutil import staged_dir

REQUIREMENTS = "requirements.txt"
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
        _pip_install(requirements, tmp)
        (tmp / _DONE).write_text(str(requirements.resolve()) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # a leftover without the marker is unfinished
    return target


def _pip_install(requirements: Path, target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    cmd += ["--target", str(target), "-r", str(requirements.resolve())]
    proc = subprocess.run(cmd, cwd=requirements.parent, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-_PIP_TAIL_LINES:])
        raise UnsupportedModelError(
            f"installing the model's {requirements} failed (pip exit code {proc.returncode}). Fix the "
            f"file or make its packages reachable (index, proxy, or local paths). pip said:\n{tail}"
        )
