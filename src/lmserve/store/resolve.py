"""Turn whatever names a model into a local directory: ``resolve_model``.

Accepted forms, tried in the order of ``_FORMS`` (the first whose predicate matches fetches):
a local directory; a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` file or ``s3://`` object; an ``s3://`` prefix;
a ``.gguf`` file; a Hugging Face Hub id ``org/name[@revision]``.

When the fetched directory's ``serving.properties`` names another location in ``option.model_id`` (or
its alias ``option.s3url``), that is resolved too: a tarball holding only ``serving.properties`` can
point at weights on S3 or the Hub. The result's ``path`` is then the weights directory, while
``properties`` stays the first directory's ``serving.properties`` (the one whose settings apply).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmserve.cache import cache_subdir
from lmserve.errors import ConfigError, ModelNotFoundError
from lmserve.store.archive import extract_archive, file_digest, is_archive_name
from lmserve.store.hub import fetch_hub_model, is_hub_id, parse_hub_id
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
    ``kind`` and ``source`` say where ``path`` came from.
    """

    path: Path
    kind: Kind
    source: str
    properties: Path | None
    has_custom_handler: bool

    @property
    def model_dir(self) -> Path:
        """The directory of ``serving.properties``, ``model.py`` and ``requirements.txt``."""
        return self.properties.parent if self.properties is not None else self.path


@dataclass(frozen=True)
class _Form:
    kind: Kind
    description: str
    matches: Callable[[str], bool]
    fetch: Callable[[str, str | None, bool], Path]  # (uri, revision, progress) -> directory


def resolve_model(
    uri: str | os.PathLike[str], *, revision: str | None = None, progress: bool = True
) -> ResolvedModel:
    """Fetch the model named by ``uri`` (if it is not local) and return where it lies.

    ``uri`` is any of ``accepted_forms()`` (a ``Path`` is taken as a local path). ``revision`` applies
    to a Hub id (a branch, tag or commit); ``progress`` shows download bars.

    Raises:
        ModelNotFoundError: ``uri`` has none of the accepted forms, or fetching it failed.
        ConfigError: ``option.model_id`` chains lead back to a location already visited.
    """
    first_path, kind, source = _fetch(os.fspath(uri), revision, progress)
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
        path, kind, source = _fetch(target, target_revision, progress)
        visited.append(source)
    return ResolvedModel(path, kind, source, properties, has_handler)


def accepted_forms() -> list[str]:
    """Human-readable descriptions of the model locations ``resolve_model`` accepts."""
    return [form.description for form in _FORMS]


def _fetch(uri: str, revision: str | None, progress: bool) -> tuple[Path, Kind, str]:
    for form in _FORMS:
        if form.matches(uri):
            return form.fetch(uri, revision, progress), form.kind, _identity(uri)
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


def _fetch_local_dir(uri: str, revision: str | None, progress: bool) -> Path:
    return _local(uri).resolve()


def _is_local_archive(uri: str) -> bool:
    return is_archive_name(uri) and _local(uri).is_file()


def _fetch_local_archive(uri: str, revision: str | None, progress: bool) -> Path:
    return extract_archive(_local(uri).resolve(), progress=progress)


def _is_gguf(uri: str) -> bool:
    return uri.lower().endswith(".gguf") and _local(uri).is_file()


def _fetch_gguf(uri: str, revision: str | None, progress: bool) -> Path:
    """Import a GGUF file into ``<cache>/gguf/<sha256 of the file>``.

    ``import_gguf`` builds the directory atomically and returns at once when it already holds an
    import of this file, so a second resolve costs only the (remembered) digest.
    """
    from lmserve.store.gguf import import_gguf  # numpy and gguf: only GGUF users pay for them

    source = _local(uri).resolve()
    return Path(import_gguf(source, cache_subdir("gguf") / file_digest(source), progress=progress))


# --- remote locations ------------------------------------------------------------------------------


def _is_s3_archive(uri: str) -> bool:
    return is_s3_uri(uri) and is_archive_name(uri)


def _fetch_s3_archive(uri: str, revision: str | None, progress: bool) -> Path:
    return extract_archive(download_s3_object(uri, progress=progress), progress=progress)


def _fetch_s3_prefix(uri: str, revision: str | None, progress: bool) -> Path:
    return sync_s3_prefix(uri, progress=progress).path


def _fetch_hub(uri: str, revision: str | None, progress: bool) -> Path:
    repo_id, id_revision = parse_hub_id(uri)
    if revision and id_revision and revision != id_revision:
        raise ConfigError("revision", revision, f"the revision in the model id {uri!r}, or no revision")
    return fetch_hub_model(repo_id, revision=revision or id_revision, progress=progress)


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
