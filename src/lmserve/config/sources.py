"""Where configuration values come from, and which one wins.

Each source (CLI, ``SERVING_*`` env, ``serving.properties``, ``OPTION_*`` env) becomes a list of
``Setting``s at its ``Level``; ``resolve`` keeps one setting per key: the highest level, then, within
one level, the canonical spelling over an alias over an env shortcut, then the one given last.
Unknown keys fail here, naming the key, where it came from and the closest known key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from lmserve.config.keys import KEYS, Key, closest_key, find_key
from lmserve.config.properties import PropertiesFile
from lmserve.errors import ConfigError

# Variables DJL Serving reads for its JVM or model-loading that have no meaning for lmserve.
IGNORED_SERVING_ENV = ("SERVING_OPTS", "SERVING_FEATURES", "SERVING_LOAD_MODELS")
_SHORTCUTS = {key.shortcut: key for key in KEYS if key.shortcut}
_OPTION_NAMES = tuple(name for key in KEYS for name in key.names if name.startswith("option."))


class Level(IntEnum):
    """Precedence of a source; higher wins."""

    OPTION_ENV = 1
    PROPERTIES = 2
    SERVING_ENV = 3
    CLI = 4


@dataclass(frozen=True)
class Setting:
    """One raw value for one key, with where it came from."""

    key: Key
    raw: object
    source: str  # e.g. "env OPTION_DTYPE", "model/serving.properties line 3", "CLI --dtype"
    level: Level
    rank: int  # 0 = canonical spelling, then aliases, then the env shortcut


def from_properties(props: PropertiesFile) -> list[Setting]:
    """Settings of a parsed ``serving.properties``; server keys are refused there. Beside a custom
    handler, unknown ``option.*`` keys are the handler's own settings: they are left to it (it reads
    them at initialisation), as the managed containers do."""
    settings = []
    handler_owned = _beside_custom_handler(props)
    for entry in props.entries:
        if handler_owned and entry.key.lower().startswith("option.") and find_key(entry.key) is None:
            continue
        key, rank = _known(entry.key, entry.value, entry.source)
        if key.scope == "server":
            raise ConfigError(
                key.name, entry.value,
                f"server settings come from SERVING_{key.name.upper()} or {key.flag or 'the CLI'}, "
                "not from a model's serving.properties", entry.source,
            )  # fmt: skip
        settings.append(Setting(key, entry.value, entry.source, Level.PROPERTIES, rank))
    return settings


def _beside_custom_handler(props: PropertiesFile) -> bool:
    """A ``model.py`` next to the file, or an ``option.entryPoint`` naming a file or a function."""
    entry = next((e.value.strip() for e in props.entries if e.key.lower() == "option.entrypoint"), "")
    if entry.endswith(".py") or ":" in entry:
        return True
    return (Path(props.origin).parent / "model.py").is_file()


def from_option_env(env: Mapping[str, str]) -> list[Setting]:
    """``OPTION_<NAME>`` (as ``option.<name>``, any case) and the shortcut variables."""
    settings = []
    for var, value in env.items():
        upper, source = var.upper(), f"env {var}"
        if upper in _SHORTCUTS:
            key = _SHORTCUTS[upper]
            settings.append(Setting(key, value, source, Level.OPTION_ENV, len(key.names)))
        elif upper.startswith("OPTION_"):
            name = "option." + var[len("OPTION_") :].lower()
            key, rank = _known(name, value, source, env_prefix="OPTION_", pool=_OPTION_NAMES)
            settings.append(Setting(key, value, source, Level.OPTION_ENV, rank))
    return settings


def from_serving_env(env: Mapping[str, str]) -> tuple[list[Setting], list[str]]:
    """``SERVING_<KEY>``: ``SERVING_OPTION_<NAME>`` is ``option.<name>``, any other ``SERVING_<NAME>``
    is the key ``<name>`` (any case), e.g. SERVING_PORT, SERVING_MINWORKERS, SERVING_BATCH_SIZE."""
    settings, warnings = [], []
    for var, value in env.items():
        upper, source = var.upper(), f"env {var}"
        if not upper.startswith("SERVING_"):
            continue
        if upper in IGNORED_SERVING_ENV:
            warnings.append(f"{var} ignored: a DJL Serving launcher setting with no meaning in lmserve")
            continue
        name = var[len("SERVING_") :].lower()
        if name.startswith("option_"):
            name = "option." + name[len("option_") :]
        key, rank = _known(name, value, source, env_prefix="SERVING_")
        settings.append(Setting(key, value, source, Level.SERVING_ENV, rank))
    return settings, warnings


def from_cli(cli: Mapping[str, object], flags: Mapping[str, str]) -> list[Setting]:
    """Settings from CLI overrides keyed by key spelling; None values mean "flag not given".
    ``flags`` maps a key's canonical name to the flag that set it, for error messages."""
    settings = []
    for name, value in cli.items():
        if value is None:
            continue
        key, rank = _known(name, value, f"CLI --option {name}")
        source = f"CLI {flags[key.name]}" if key.name in flags else f"CLI --option {name}"
        settings.append(Setting(key, value, source, Level.CLI, rank))
    return settings


def resolve(settings: Iterable[Setting]) -> tuple[dict[str, Setting], list[str]]:
    """The winning setting per canonical key name, and a warning for each value that lost within
    its own level (the same key given twice in one source)."""
    ordered = list(settings)
    winners: dict[str, tuple[Setting, tuple[int, int, int]]] = {}
    for order, setting in enumerate(ordered):
        score = (setting.level, -setting.rank, order)
        current = winners.get(setting.key.name)
        if current is None or score > current[1]:
            winners[setting.key.name] = (setting, score)
    warnings = [
        f"{s.key.name} from {s.source} ({s.raw!r}) is ignored: {w.source} ({w.raw!r}) sets it too"
        for s in ordered
        for w, _ in [winners[s.key.name]]
        if s is not w and s.level == w.level
    ]
    return {name: setting for name, (setting, _) in winners.items()}, warnings


def _known(
    name: str, value: object, source: str, *, env_prefix: str = "", pool: tuple[str, ...] | None = None
) -> tuple[Key, int]:
    found = find_key(name)
    if found is not None:
        return found
    guess = closest_key(name, pool)
    if guess and env_prefix:
        guess = _env_spelling(env_prefix, guess)
    hint = f", did you mean {guess}?" if guess else " (see the key reference)"
    raise ConfigError(name, value, f"only known keys; '{name}' is unknown{hint}", source)


def _env_spelling(prefix: str, name: str) -> str:
    """How key ``name`` is written as an environment variable with ``prefix``."""
    if prefix == "OPTION_":
        return prefix + name[len("option.") :].upper()
    return prefix + name.replace(".", "_").upper()
