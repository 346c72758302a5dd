"""Build the one ``ServingConfig`` from CLI flags, environment, ``serving.properties`` and defaults.

Precedence, highest first (as in DJL Serving):

1. CLI: ``cli`` overrides, keyed by key name (``cli_overrides`` builds them from flags and
   ``--option KEY=VALUE``); a ``None`` value means "not given" and overrides nothing.
2. ``serving.properties``: the ``properties`` file (or a directory holding one), else the one in
   the model directory when ``model_id`` is a local directory.
3. ``OPTION_*`` env: ``OPTION_<NAME>`` sets ``option.<name>`` in any case (OPTION_ENTRYPOINT ->
   option.entryPoint, OPTION_S3URL -> option.s3url); the shortcuts HF_MODEL_ID,
   TENSOR_PARALLEL_DEGREE, MAX_BATCH_SIZE, MAX_CONCURRENT_REQUESTS, HF_REVISION and
   HF_TRUST_REMOTE_CODE count here too, below an ``OPTION_*`` variable for the same key.
4. ``SERVING_*`` env, the server-wide defaults: ``SERVING_OPTION_<NAME>`` sets ``option.<name>``;
   any other ``SERVING_<NAME>`` sets the key ``<name>``. Names match keys in any case: SERVING_PORT
   -> port, SERVING_API_KEY -> api_key, SERVING_BATCH_SIZE -> batch_size, SERVING_MINWORKERS ->
   minWorkers, SERVING_GPU_MINWORKERS -> gpu.minWorkers, SERVING_OPTION_DTYPE -> option.dtype.
   Server keys (``scope="server"``: host, port, api_key, enable_model_api, allowed_urls, model_store,
   trust_remote_code_urls, max_extracted_bytes, ...) come only from here or the CLI, never from a
   model's own files.
5. Defaults: the dataclass field defaults in ``lmserve.config.settings``.

Every problem is collected before anything is raised (``analyse_config``), so one error lists every
unknown key, refused key and bad value; ``option.strict_config=false`` makes unknown keys warnings.

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

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmserve.config.flags import FLAG_OF
from lmserve.config.keys import KEYS, key_by_name
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
    Gathered,
    Setting,
    Unknown,
    from_cli,
    from_option_env,
    from_properties,
    from_serving_env,
    resolve,
)
from lmserve.errors import ConfigError, ConfigErrors, UnknownKeyError, UnsupportedKeyError

PROPERTIES_FILE = "serving.properties"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".gguf")


@dataclass(frozen=True)
class Analysis:
    """What every source said and what became of it; ``config`` is None when there are errors."""

    settings: tuple[Setting, ...]  # every known key as given, lower levels first
    winners: Mapping[str, Setting]  # the setting that counts, per canonical key name
    values: Mapping[str, Any]  # the parsed value of each winner lmserve uses
    unknown: tuple[Unknown, ...]
    warnings: tuple[str, ...]
    errors: tuple[ConfigError, ...]
    config: ServingConfig | None


def load_serving_config(
    model_id: str | None = None,
    *,
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    properties: Path | None = None,
) -> ServingConfig:
    """Build the frozen serving configuration; see the module docstring for the rules.

    ``env`` defaults to ``os.environ``. Raises ConfigError naming key, value, source and what is
    allowed (``ConfigErrors``, listing each, when there are several). Warnings (ignored keys, LMI
    values mapped to lmserve's own, keys given twice) are returned in ``ServingConfig.warnings``;
    the caller reports them.
    """
    analysis = analyse_config(model_id, cli=cli, env=env, properties=properties)
    if analysis.errors:
        raise analysis.errors[0] if len(analysis.errors) == 1 else ConfigErrors(analysis.errors)
    assert analysis.config is not None, "no errors means a configuration was built"
    return analysis.config


def analyse_config(
    model_id: str | None = None,
    *,
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    properties: Path | None = None,
) -> Analysis:
    """Everything ``load_serving_config`` finds, every error and warning at once, without raising
    for the configuration's own problems (an unreadable properties file still raises)."""
    if model_id is not None and not model_id.strip():
        raise ConfigError("model", model_id, "a non-empty model location", "the positional argument")
    env = os.environ if env is None else env
    gathered = _gather(model_id, cli or {}, env, properties)
    winners, lost = resolve(gathered.settings)
    warnings, errors = gathered.warnings, gathered.errors
    values = _parse(winners, warnings, errors)
    _unknown_keys(gathered.unknown, values.get("option.strict_config", True), warnings, errors)
    warnings.extend(lost)
    _apply_static_batch_size(values, winners, warnings)
    config = None
    try:
        model = _model_location(model_id, values)
    except ConfigError as exc:
        errors.append(exc)
    if not errors:
        config = _build(model, values, tuple(warnings))
        errors.extend(_check(config, winners))
    return Analysis(tuple(gathered.settings), winners, values, tuple(gathered.unknown), tuple(warnings),
                    tuple(errors), None if errors else config)  # fmt: skip


def engine_config(model: str, options: Mapping[str, Any]) -> EngineConfig:
    """An ``EngineConfig`` from keyword arguments named as its fields (the offline ``LLM``'s), each
    value checked and read by the key that sets that field in serving.properties: the same spellings
    (``dtype="float16"``), the same limits, the same ``ConfigError`` naming the argument. ``None``
    leaves a field at its default; every problem is reported at once."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
    values: dict[str, Any] = {}
    errors: list[ConfigError] = []
    for name, raw in options.items():
        if name not in fields:
            near = difflib.get_close_matches(name, sorted(fields), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            errors.append(UnknownKeyError(name, raw, f"{hint}the engine's settings are {', '.join(sorted(fields))}"))
            continue
        if raw is None:
            continue
        key = _ENGINE_KEY.get(name)
        if key is None:  # a field no serving.properties key sets: taken as given
            values[name] = raw
            continue
        if type(raw).__module__ == "torch" and type(raw).__name__ == "dtype":
            raw = str(raw).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", a dtype alias
        try:
            values[name] = key.type.parse(raw)
        except (ValueError, TypeError):
            errors.append(ConfigError(name, raw, key.type.allowed))
    if len(errors) > 1:
        raise ConfigErrors(errors)
    if errors:
        raise errors[0]
    return EngineConfig(model=model, **values)


# EngineConfig field -> the key that sets it.
_ENGINE_KEY = {key.field.removeprefix("engine."): key for key in KEYS if key.field and key.field.startswith("engine.")}


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
) -> Gathered:
    gathered = Gathered()
    from_serving_env(env, gathered)
    from_option_env(env, gathered)
    path = _properties_path(model_id, properties)
    if path is not None:
        from_properties(read_properties(path), gathered)
    from_cli(cli, FLAG_OF, gathered)
    return gathered


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


def _parse(winners: Mapping[str, Setting], warnings: list[str], errors: list[ConfigError]) -> dict[str, Any]:
    """Typed value per canonical key name of the keys lmserve uses; ignored keys add their warning
    line, refused keys their error, and so does every value a key does not allow."""
    values: dict[str, Any] = {}
    for name, setting in winners.items():
        key, shown = setting.key, f"{setting.spelling}={setting.raw!r} (from {setting.source})"
        try:
            value = key.type.parse(setting.raw)
        except (ValueError, TypeError):
            errors.append(ConfigError(setting.spelling, setting.raw, key.type.allowed, setting.source))
            continue
        if key.refused and str(value).strip().lower() not in key.accepts:
            errors.append(UnsupportedKeyError(setting.spelling, setting.raw, key.refused, key.accepts, setting.source))
        elif key.ignored:
            warnings.append(f"{shown} ignored: {key.ignored}")
        elif key.honoured:
            values[name] = value
        warnings.extend(f"{shown}: {note.text}" for note in key.notes if note.applies(setting.raw))
    return values


def _unknown_keys(unknown: list[Unknown], strict: bool, warnings: list[str], errors: list[ConfigError]) -> None:
    """Each unknown key is an error, or with ``option.strict_config=false`` a warning."""
    for entry in unknown:
        if strict:
            hint = f"{entry.hint()} (option.strict_config=false makes unknown keys warnings)"
            errors.append(UnknownKeyError(entry.name, entry.raw, hint, entry.source))
        else:
            warnings.append(f"{entry.name}={entry.raw!r} (from {entry.source}) ignored: unknown key "
                            f"(option.strict_config=false), {entry.hint()}")  # fmt: skip


def _apply_static_batch_size(values: dict[str, Any], winners: Mapping[str, Setting], warnings: list[str]) -> None:
    """option.batch_size (Neuron LMI) sets the rolling batch size, or the dynamic batch size when
    rolling batching is disabled, unless that field's own key is given at the same level or higher."""
    if "option.batch_size" not in values:
        return
    rolling = values.get("option.rolling_batch", "auto") == "auto"
    target = "option.max_rolling_batch_size" if rolling else "batch_size"
    own, given = winners.get(target), winners["option.batch_size"]
    if own is None or own.level < given.level:
        values[target] = values["option.batch_size"]
        if not rolling:  # it lands on a field that is not used yet: say so, as batch_size itself does
            warnings.extend(f"option.batch_size={given.raw!r} (from {given.source}) sets batch_size: {note.text}"
                            for note in key_by_name("batch_size").notes)  # fmt: skip


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


def _check(config: ServingConfig, winners: Mapping[str, Setting]) -> list[ConfigError]:
    """Rules that involve two keys; each error names the key that has to change."""
    errors = []
    for prefix in ("gpu.", "cpu."):
        low, high = (f"{prefix}{bound}Workers" for bound in ("min", "max"))
        low, high = (name if name in winners else name.removeprefix(prefix) for name in (low, high))
        if low in winners and high in winners:
            least, most = config.workers.bounds("cuda" if prefix == "gpu." else "cpu")
            if least is not None and most is not None and least > most:
                errors.append(ConfigError(low, least, f"<= {high} ({most})", winners[low].source))
                break
    if config.server.protect_inference and not config.server.api_key:
        source = winners["protect_inference"].source
        errors.append(ConfigError(
            "protect_inference", True, "true only with an api key (SERVING_API_KEY or --api-key)", source
        ))  # fmt: skip
    return errors
