"""``lmserve package DIR -o mymodel.tar.gz``: check a model directory, then pack it the way the
managed containers expect (its files at the archive's root).

Checks, before anything is written: ``serving.properties`` parses and every key in it is known and
valid (the error names the key, as the server's would); a ``model.py`` imports and defines
``handle``, in a child process so that nothing it does touches this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

from lmserve.errors import LMServeError


class PackageError(LMServeError):
    """The directory cannot be packaged as it is; the message says what to fix."""

_IMPORT_CHECK = """
import importlib.util, sys
sys.path.insert(0, ".")
spec = importlib.util.spec_from_file_location("model", "model.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
if not callable(getattr(module, "handle", None)):
    sys.exit("model.py defines no handle(inputs) function")
"""


def check_model_dir(directory: Path) -> None:
    """Raise ``ConfigError`` (a bad key) or ``PackageError`` naming the first problem (see the module docstring)."""
    from lmserve.config import load_serving_config

    if not directory.is_dir():
        raise PackageError(f"{directory} is not a directory")
    if not any(directory.iterdir()):
        raise PackageError(f"{directory} is empty: nothing to package")
    if (directory / "serving.properties").is_file():
        load_serving_config(str(directory))
    if (directory / "model.py").is_file():
        done = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], cwd=directory, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise PackageError(f"model.py does not import cleanly: {last}")


def package(directory: str | os.PathLike[str], output: str | os.PathLike[str], progress: bool = True) -> Path:
    """Check ``directory`` and write it as a ``.tar.gz`` at ``output``; returns the archive's path."""
    source, target = Path(directory), Path(output)
    check_model_dir(source)
    files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and p.resolve() != target.resolve())  # fmt: skip
    partial = target.with_name(target.name + ".partial")
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"packing {target.name}", disable=not progress) as bar, \
            tarfile.open(partial, "w:gz") as tar:  # fmt: skip
        for path in files:
            tar.add(path, arcname=path.relative_to(source).as_posix())
            bar.update(path.stat().st_size)
    partial.replace(target)  # never leave a half-written archive under the requested name
    return target
