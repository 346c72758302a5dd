"""Models on the Hugging Face Hub: ``org/name`` (optionally ``org/name@revision``).

Fetched with ``huggingface_hub.snapshot_download`` into the ordinary Hub cache, so a model already
downloaded by transformers or the ``hf`` CLI is reused. Only what serving needs is fetched: one weight
format (safetensors when the repo has it, else PyTorch ``.bin``), configs, tokenizer files,
``serving.properties``, ``model.py`` / remote code and ``requirements.txt``.

``HF_HUB_CACHE`` / ``HF_HOME`` and ``HF_HUB_OFFLINE`` are read on every call (``huggingface_hub`` reads
them once, at import), so setting them after start-up still takes effect.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)

from lmserve.errors import ModelNotFoundError

# Repo names on the Hub: letters, digits, '-', '_', '.'; ``@revision`` is a branch, tag or commit.
_HUB_ID = re.compile(r"^(?P<repo>[\w.-]{1,96}/[\w.-]{1,96})(?:@(?P<rev>[\w./-]+))?$")
SAFETENSORS_PATTERNS = ["*.safetensors"]
PYTORCH_PATTERNS = ["*.bin", "*.pt"]
# Configs (incl. weight index files), tokenizers, chat templates, remote code, DJL files.
# What fetching can raise for reasons outside lmserve: the Hub's errors are OSErrors, and so are the
# HTTP client's in older huggingface_hub versions; newer ones raise the client's own HTTPError, a base
# of HfHubHTTPError that we take from there rather than importing a particular HTTP library.
_FETCH_ERRORS: tuple[type[Exception], ...] = (HFValidationError, OSError) + tuple(
    base for base in HfHubHTTPError.__mro__[1:] if base not in (OSError, Exception, BaseException, object)
)
SUPPORT_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py", "serving.properties"]


def is_hub_id(uri: str) -> bool:
    """Whether ``uri`` has the form of a Hub model id: ``org/name`` or ``org/name@revision``."""
    match = _HUB_ID.match(uri)
    return match is not None and ".." not in uri and "--" not in match.group("repo")


def parse_hub_id(uri: str) -> tuple[str, str | None]:
    """Split ``org/name@revision`` into ``("org/name", "revision")``; the revision may be None."""
    match = _HUB_ID.match(uri)
    if match is None:
        raise ModelNotFoundError(f"{uri!r} is not a Hugging Face Hub model id; expected org/name[@revision].")
    return match.group("repo"), match.group("rev")


def hub_offline() -> bool:
    """Whether Hub offline mode is on (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set true)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "true", "yes", "on"}


def hub_cache_dir() -> Path:
    """The Hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def fetch_hub_model(repo_id: str, *, revision: str | None = None, progress: bool = True) -> Path:
    """Download (or find in the cache) the files of ``repo_id`` needed to serve it; return the snapshot.

    Raises:
        ModelNotFoundError: the repo or revision does not exist, is gated or private without a token,
            or the Hub cannot be reached (or offline mode is on) and the cache does not hold it. The
            message names the id and says whether offline mode was on.
    """
    offline, cache_dir = hub_offline(), hub_cache_dir()
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        files = None if offline else _repo_files(repo_id, revision, endpoint)
        # Unknown listing (offline, or the Hub unreachable): the cached snapshot is used as it is.
        weights = SAFETENSORS_PATTERNS + PYTORCH_PATTERNS if files is None else weight_patterns(files)
        with _progress_bars(progress):
            path = huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=offline,
                allow_patterns=SUPPORT_PATTERNS + weights,
                endpoint=endpoint,
            )
    except _FETCH_ERRORS as exc:
        raise ModelNotFoundError(_not_found_message(repo_id, revision, offline, cache_dir, exc)) from exc
    return Path(path)


def weight_patterns(repo_files: list[str]) -> list[str]:
    """The weight files to fetch: safetensors when the repo has any, else PyTorch pickles."""
    has_safetensors = any(fnmatch(name, pattern) for name in repo_files for pattern in SAFETENSORS_PATTERNS)
    return SAFETENSORS_PATTERNS if has_safetensors else PYTORCH_PATTERNS


def _repo_files(repo_id: str, revision: str | None, endpoint: str | None) -> list[str] | None:
    """The repo's file names, or None when the Hub cannot be reached (the cache may still serve).

    One ``model_info`` call: unlike the tree listing it is not retried with back-off, so a machine
    without network fails over to the cache at once.
    """
    try:
        info = huggingface_hub.HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except _FETCH_ERRORS:
        return None
    return [sibling.rfilename for sibling in info.siblings or []]


def _not_found_message(
    repo_id: str, revision: str | None, offline: bool, cache_dir: Path, exc: Exception
) -> str:
    if isinstance(exc, GatedRepoError):
        reason = "the repo is gated: accept its terms on the Hub and set HF_TOKEN"
    elif isinstance(exc, RepositoryNotFoundError):
        reason = "no such repo (or it is private and HF_TOKEN is missing or lacks access)"
    elif isinstance(exc, RevisionNotFoundError):
        reason = f"the repo has no revision {revision!r}"
    elif isinstance(exc, LocalEntryNotFoundError):
        reason = f"it is not in the local Hub cache {cache_dir}"
        if not offline and exc.__cause__ is not None:
            reason = f"the Hub could not be reached ({type(exc.__cause__).__name__}) and {reason}"
    else:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if offline:
        mode = (
            "Offline mode is on (HF_HUB_OFFLINE=1), so only the local cache was searched: run once with "
            "network access, or point HF_HUB_CACHE/HF_HOME at a cache that holds the model."
        )
    else:
        mode = "Offline mode is off; check the id and revision, the network, and HF_TOKEN for private repos."
    return (
        f"cannot fetch Hugging Face Hub model {repo_id!r} (revision {revision or 'main'}): {reason}. {mode}"
    )


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence the Hub's per-file progress bars for this call only (their switch is process-wide)."""
    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
