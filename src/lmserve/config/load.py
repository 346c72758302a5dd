"""Build the one ``ServingConfig`` from CLI flags, environment, ``serving.properties`` and defaults.

Precedence, highest first:

1. CLI: ``cli`` overrides, keyed by key name (``cli_overrides`` builds them from flags and
   ``--option KEY=VALUE``); a ``None`` value means "not given" and overrides nothing.
2. ``SERVING_*`` env: ``SERVING_OPTION_<NAME>`` sets ``option.<name>``; any other ``SERVING_<NAME>``
   sets the key ``<name>``. Names match keys in any case: SERVING_PORT -> port, SERVING_API_KEY ->
   api_key, SERVING_BATCH_SIZE -> batch_size, SERVING_MINWORKERS -> minWorkers,
   SERVING_OPTION_DTYPE -> option.dtype. Server keys (host, port, api_key, protect_inference,
   enable_model_api, allowed_urls, model_store, trust_remote_code_urls, max_extracted_bytes,
   max_request_bytes, queue_full_status, graceful_shutdown_s) come only from here or the CLI.
3. ``serving.properties``: the ``properties`` file (or a directory holding one), else the one in
   the model directory when ``model_id`` is a local directory.
4. ``OPTION_*`` env: ``OPTION_<NAME>`` sets ``option.<name>`` in any case (OPTION_ENTRYPOINT ->
   option.entryPoint, OPTION_S3URL -> option.s3url); the shortcuts HF_MODEL_ID,
   TENSOR_PARALLEL_DEGREE, MAX_BATCH_SIZE, MAX_CONCURRENT_REQUESTS, HF_REVISION and
   HF_TRUST_REMOTE_CODE count here too, below an ``OPTION_*`` variable for the same key.
5. Defaults: the dataclass field defaults in ``lmserve.config.settings``.

No other environment variable is read. Within one level the canonical key name beats an alias,
which beats an env shortcut; a lost value leaves a warning. Only the winning value of each key is
validated, so a higher level can replace a bad value below it.

The model: a positional ``model_id`` that is not a local directory is used as given. A local
directory is the model directory (as in DJL): ``option.model_id`` from any level, when set, names the
weights instead, else the directory itself is the model. Without a positional argument the model is
``option.model_id``; neither is a ConfigError. The served name defaults to the last component of
the model id without ``.tar.gz``/``.tgz``/``.tar``/``.gguf``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmserve.config.flags import FLAG_OF
from lmserve.config.keys import KEYS
from lmserve.config.properties import read_properties
from lmserve.config.settings import (
    BatchingConfig,
    EngineConfig,
    ModelSpec,
    ServerConfig,
    ServingConfig,
    WorkerConfig,
)
from lmserve.config.sources import (
    Setting,
    from_cli,
    from_option_env,
    from_properties,
    from_serving_env,
    resolve,
)
from lmserve.errors import ConfigError

PROPERTIES_FILE = "serving.properties"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".gguf")


def load_serving_config(
    model_id: str | None = None,
    *,
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    properties: Path | None = None,
) -> ServingConfig:
    """Build the frozen serving configuration; see the module docstring for the rules.

    ``env`` defaults to ``os.environ``. Raises ConfigError naming key, value, source and what is
    allowed for any unknown key or bad value. Warnings (ignored keys, LMI values mapped to lmserve's
    own, keys given twice) are returned in ``ServingConfig.warnings``; the caller reports them.
    """
    if model_id is not None and not model_id.strip():
        raise ConfigError("model", model_id, "a non-empty model location", "the positional argument")
    env = os.environ if env is None else env
    settings, warnings = _gather(model_id, cli or {}, env, properties)
    winners, lost = resolve(settings)
    values = _parse(winners, warnings)
    warnings.extend(lost)
    _apply_static_batch_size(values, winners)
    model = _model_location(model_id, values)
    config = _build(model, values, tuple(warnings))
    _check(config, winners)
    return config


def default_model_name(model_id: str) -> str:
    """The last path or id component of ``model_id``, without archive or GGUF suffixes."""
    path = Path(model_id)
    tail = path.resolve().name if "://" not in model_id and path.exists() else ""
    tail = tail or model_id.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for suffix in _ARCHIVE_SUFFIXES:
        if tail.lower().endswith(suffix) and len(tail) > len(suffix):
            return tail[: -len(suffix)]
    return tail or model_id


def _gather(
    model_id: str | None, cli: Mapping[str, object], env: Mapping[str, str], properties: Path | None
) -> tuple[list[Setting], list[str]]:
    settings = from_option_env(env)
    warnings: list[str] = []
    path = _properties_path(model_id, properties)
    if path is not None:
        props = read_properties(path)
        settings += from_properties(props)
        warnings += props.warnings
    serving, serving_warnings = from_serving_env(env)
    return settings + serving + from_cli(cli, FLAG_OF), warnings + serving_warnings


def _properties_path(model_id: str | None, properties: Path | None) -> Path | None:
    if properties is not None:
        path = Path(properties)
        path = path / PROPERTIES_FILE if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(
                "properties", str(properties),
                f"an existing {PROPERTIES_FILE} file, or a directory holding one", "--properties",
            )  # fmt: skip
        return path
    if model_id is not None and (Path(model_id) / PROPERTIES_FILE).is_file():
        return Path(model_id) / PROPERTIES_FILE
    return None


def _spelling(setting: Setting) -> str:
    """The key name as the user wrote it (an alias stays an alias; a shortcut names its key)."""
    names = setting.key.names
    return names[setting.rank] if setting.rank < len(names) else setting.key.name


def _parse(winners: Mapping[str, Setting], warnings: list[str]) -> dict[str, Any]:
    """Typed value per canonical key name; ignored keys only add their warning line."""
    values: dict[str, Any] = {}
    for name, setting in winners.items():
        key, shown = setting.key, f"{_spelling(setting)}={setting.raw!r} (from {setting.source})"
        if key.ignored:
            warnings.append(f"{shown} ignored: {key.ignored}")
            continue
        try:
            values[name] = key.type.parse(setting.raw)
        except (ValueError, TypeError):
            raise ConfigError(_spelling(setting), setting.raw, key.type.allowed, setting.source) from None
        if str(setting.raw).strip().lower() in key.warn_on:
            warnings.append(f"{shown}: {key.warn_text}")
    return values


def _apply_static_batch_size(values: dict[str, Any], winners: Mapping[str, Setting]) -> None:
    """option.batch_size (Neuron LMI) sets the rolling batch size, or the dynamic batch size when
    rolling batching is disabled, unless that field's own key is given at the same level or higher."""
    if "option.batch_size" not in values:
        return
    rolling = values.get("option.rolling_batch", "auto") == "auto"
    target = "option.max_rolling_batch_size" if rolling else "batch_size"
    own = winners.get(target)
    if own is None or own.level < winners["option.batch_size"].level:
        values[target] = values["option.batch_size"]


def _model_location(model_id: str | None, values: Mapping[str, Any]) -> str:
    if model_id is not None and not Path(model_id).is_dir():
        return model_id
    configured = values.get("option.model_id")
    if configured is not None:
        return str(configured)
    if model_id is not None:
        return model_id
    raise ConfigError(
        "option.model_id", None,
        "a model: the positional argument, option.model_id (or option.s3url) in serving.properties, "
        "OPTION_MODEL_ID or HF_MODEL_ID",
    )  # fmt: skip


def _build(model: str, values: Mapping[str, Any], warnings: tuple[str, ...]) -> ServingConfig:
    sections: dict[str, dict[str, Any]] = {
        section: {} for section in ("model", "engine", "batching", "workers", "server")
    }
    for key in KEYS:
        if key.field and key.name in values:
            section, attribute = key.field.split(".")
            sections[section][attribute] = values[key.name]
    sections["model"]["model_id"] = model
    name = sections["model"].setdefault("name", default_model_name(model))
    return ServingConfig(
        model=ModelSpec(**sections["model"]),
        engine=EngineConfig(model=model, served_name=name, **sections["engine"]),
        batching=BatchingConfig(**sections["batching"]),
        workers=WorkerConfig(**sections["workers"]),
        server=ServerConfig(**sections["server"]),
        warnings=warnings,
    )


def _check(config: ServingConfig, winners: Mapping[str, Setting]) -> None:
    """Rules that involve two keys; each error names the key that has to change."""
    workers = config.workers
    if workers.min_workers and workers.max_workers and workers.min_workers > workers.max_workers:
        source = winners["minWorkers"].source
        raise ConfigError("minWorkers", workers.min_workers, f"<= maxWorkers ({workers.max_workers})", source)
    if config.server.protect_inference and not config.server.api_key:
        source = winners["protect_inference"].source
        raise ConfigError(
            "protect_inference", True, "true only with an api key (SERVING_API_KEY or --api-key)", source
        )
