"""Turn whatever names a model into a local directory: ``resolve_model``.

Accepted forms, tried in the order of ``_FORMS`` (the first whose predicate matches fetches):
a local directory; a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` file or ``s3://`` object; an ``s3://`` prefix;
a ``.gguf`` file; a Hugging Face Hub id ``org/name[@revision]``.

When the fetched directory's ``serving.properties`` names another location in ``option.model_id`` (or
its alias ``option.s3url``), that is resolved too: a tarball holding only ``serving.properties`` can
point at weights on S3 or the Hub. The result's ``path`` is then the weights directory, while
``properties`` stays the first directory's ``serving.properties`` (the one whose settings apply).

A ``FetchPolicy`` bounds what is fetched: every location visited (the given one and each
``option.model_id`` hop) must match its ``allowed_urls``, and archives extract to at most its
``max_extracted_bytes``. The result lists the cache directories this call created, so a caller
whose load then fails can delete them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmserve.cache import cache_subdir
from lmserve.errors import ConfigError, ModelNotFoundError
from lmserve.store.archive import archive_cache_dir, extract_archive, file_digest, is_archive_name
from lmserve.store.hub import fetch_hub_model, is_hub_id, parse_hub_id
from lmserve.store.policy import FetchPolicy
from lmserve.store.s3 import download_s3_object, is_s3_uri, sync_s3_prefix

Kind = Literal["local", "archive", "s3", "hub", "gguf"]
PROPERTIES = "serving.properties"
HANDLER = "model.py"
_MODEL_KEYS = ("option.model_id", "option.s3url")


@dataclass(frozen=True)
class ResolvedModel:
    """A model fetched into a local directory.

    ``path`` holds the weights and configs. ``properties`` is the ``serving.properties`` that applies
    (None when there is none); ``model.py`` and ``requirements.txt`` sit beside it, in ``model_dir``.
    ``kind`` and ``source`` say where ``path`` came from. ``created`` are the cache directories this
    resolve made (archive extractions), not shared with an earlier fetch.
    """

    path: Path
    kind: Kind
    source: str
    properties: Path | None
    has_custom_handler: bool
    created: tuple[Path, ...] = ()

    @property
    def model_dir(self) -> Path:
        """The directory of ``serving.properties``, ``model.py`` and ``requirements.txt``."""
        return self.properties.parent if self.properties is not None else self.path


@dataclass
class _Fetch:
    """One resolve's settings, and the cache directories it created."""

    progress: bool
    policy: FetchPolicy
    created: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Form:
    kind: Kind
    description: str
    matches: Callable[[str], bool]
    fetch: Callable[[str, str | None, _Fetch], Path]  # (uri, revision, this fetch) -> directory


def resolve_model(
    uri: str | os.PathLike[str], *, revision: str | None = None, progress: bool = True,
    policy: FetchPolicy | None = None,
) -> ResolvedModel:
    """Fetch the model named by ``uri`` (if it is not local) and return where it lies.

    ``uri`` is any of ``accepted_forms()`` (a ``Path`` is taken as a local path). ``revision`` applies
    to a Hub id (a branch, tag or commit); ``progress`` shows download bars; ``policy`` bounds
    the locations and archive sizes (default: any location, the default size limit).

    Raises:
        ModelNotFoundError: ``uri`` has none of the accepted forms, or fetching it failed.
        ConfigError: ``option.model_id`` chains lead back to a location already visited.
        NotAllowedError: a location is outside ``policy.allowed_urls`` (nothing of it is fetched).
        UnsupportedModelError: an archive is damaged, unsafe or over ``max_extracted_bytes``.
    """
    fetch = _Fetch(progress, policy or FetchPolicy())
    try:
        return _resolve(os.fspath(uri), revision, fetch)
    except BaseException:
        for directory in fetch.created:  # e.g. a hop refused after its archive was extracted
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _resolve(given: str, revision: str | None, fetch: _Fetch) -> ResolvedModel:
    fetch.policy.check(given)
    first_path, kind, source = _fetch(given, revision, fetch)
    properties = first_path / PROPERTIES if (first_path / PROPERTIES).is_file() else None
    has_handler = (first_path / HANDLER).is_file()
    path, visited = first_path, [source]
    while (ref := _model_reference(path)) is not None:
        target, target_revision = ref
        # Pointing at itself is common (option.model_id=/opt/ml/model inside /opt/ml/model): done.
        if _identity(target) == source or _same_directory(target, path):
            break
        if _identity(target) in visited:
            chain = " -> ".join([*visited, _identity(target)])
            allowed = f"a location that does not lead back to an earlier one ({chain})"
            raise ConfigError(_MODEL_KEYS[0], target, allowed, source=str(path / PROPERTIES))
        fetch.policy.check(target, registered_as=given)
        path, kind, source = _fetch(target, target_revision, fetch)
        visited.append(source)
    return ResolvedModel(path, kind, source, properties, has_handler, tuple(fetch.created))


def accepted_forms() -> list[str]:
    """Human-readable descriptions of the model locations ``resolve_model`` accepts."""
    return [form.description for form in _FORMS]


def _fetch(uri: str, revision: str | None, fetch: _Fetch) -> tuple[Path, Kind, str]:
    for form in _FORMS:
        if form.matches(uri):
            return form.fetch(uri, revision, fetch), form.kind, _identity(uri)
    exists = "a file exists there" if _local(uri).exists() else "nothing exists at that path"
    raise ModelNotFoundError(
        f"cannot find a model at {uri!r}: {exists}, and it is none of the accepted forms: "
        + "; ".join(accepted_forms())
    )


# --- local paths -----------------------------------------------------------------------------------


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def _identity(uri: str) -> str:
    """A stable name for a location: the absolute path of a local one, else the URI itself."""
    if is_s3_uri(uri):
        return uri.rstrip("/")
    local = _local(uri)
    return str(local.resolve()) if local.exists() else uri


def _same_directory(uri: str, directory: Path) -> bool:
    local = _local(uri)
    return local.is_dir() and local.resolve() == directory.resolve()


def _is_local_dir(uri: str) -> bool:
    return _local(uri).is_dir()


def _fetch_local_dir(uri: str, revision: str | None, fetch: _Fetch) -> Path:
    return _local(uri).resolve()


def _is_local_archive(uri: str) -> bool:
    return is_archive_name(uri) and _local(uri).is_file()


def _fetch_local_archive(uri: str, revision: str | None, fetch: _Fetch) -> Path:
    return _extract(_local(uri).resolve(), fetch)


def _extract(archive: Path, fetch: _Fetch) -> Path:
    """Extract into the cache, remembering the directory when this call is the one that made it."""
    fresh = not archive_cache_dir(archive).is_dir()
    root = extract_archive(archive, progress=fetch.progress, max_bytes=fetch.policy.max_extracted_bytes)
    if fresh:
        fetch.created.append(archive_cache_dir(archive))
    return root


def _is_gguf(uri: str) -> bool:
    return uri.lower().endswith(".gguf") and _local(uri).is_file()


def _fetch_gguf(uri: str, revision: str | None, fetch: _Fetch) -> Path:
    """Import a GGUF file into ``<cache>/gguf/<sha256 of the file>``.

    ``import_gguf`` builds the directory atomically and returns at once when it already holds an
    import of this file, so a second resolve costs only the (remembered) digest.
    """
    from lmserve.store.gguf import import_gguf  # numpy and gguf: only GGUF users pay for them

    source = _local(uri).resolve()
    return Path(import_gguf(source, cache_subdir("gguf") / file_digest(source), progress=fetch.progress))


# --- remote locations ------------------------------------------------------------------------------


def _is_s3_archive(uri: str) -> bool:
    return is_s3_uri(uri) and is_archive_name(uri)


def _fetch_s3_archive(uri: str, revision: str | None, fetch: _Fetch) -> Path:
    return _extract(download_s3_object(uri, progress=fetch.progress), fetch)


def _fetch_s3_prefix(uri: str, revision: str | None, fetch: _Fetch) -> Path:
    return sync_s3_prefix(uri, progress=fetch.progress).path


def _fetch_hub(uri: str, revision: str | None, fetch: _Fetch) -> Path:
    repo_id, id_revision = parse_hub_id(uri)
    if revision and id_revision and revision != id_revision:
        raise ConfigError("revision", revision, f"the revision in the model id {uri!r}, or no revision")
    return fetch_hub_model(repo_id, revision=revision or id_revision, progress=fetch.progress)


_FORMS: tuple[_Form, ...] = (
    _Form("local", "a local model directory", _is_local_dir, _fetch_local_dir),
    _Form("archive", "a .tar.gz/.tgz/.tar/.zip file", _is_local_archive, _fetch_local_archive),
    _Form("archive", "an s3://bucket/key.tar.gz (.tgz/.tar/.zip) object", _is_s3_archive, _fetch_s3_archive),
    _Form("s3", "an s3://bucket/prefix", is_s3_uri, _fetch_s3_prefix),
    _Form("gguf", "a .gguf file", _is_gguf, _fetch_gguf),
    _Form("hub", "a Hugging Face Hub id org/name[@revision]", is_hub_id, _fetch_hub),
)


# --- serving.properties: only the keys that point elsewhere ----------------------------------------


def _model_reference(directory: Path) -> tuple[str, str | None] | None:
    """The ``(location, revision)`` this directory's serving.properties points at, if any.

    A deliberately tiny parse (``key=value`` lines, ``#`` comments) of the keys that name another
    location; everything else in the file is the config package's business. A relative location is
    taken relative to the directory when it exists there.
    """
    file = directory / PROPERTIES
    if not file.is_file():
        return None
    values: dict[str, str] = {}
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith(("#", "!")) and value.strip():
            values[key.strip()] = value.strip()
    target = next((values[k] for k in _MODEL_KEYS if k in values), None)
    if target is None:
        return None
    relative = directory / target
    if "://" not in target and not Path(target).is_absolute() and relative.exists():
        target = str(relative)
    return target, values.get("option.revision")
