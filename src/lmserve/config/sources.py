"""Where configuration values come from, and which one wins.

Each source (CLI, ``serving.properties``, ``OPTION_*`` env, ``SERVING_*`` env) adds ``Setting``s at
its ``Level`` to a ``Gathered``; ``resolve`` keeps one setting per key: the highest level, then,
within one level, the canonical spelling over an alias over an env shortcut, then the one given
last. Unknown keys are collected (with the closest honoured key) rather than raised, so that every
one of them is reported at once; the loader decides whether they are errors or warnings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from lmserve.config.keys import KEYS, Key, closest_key, find_key
from lmserve.config.properties import PropertiesFile
from lmserve.errors import ConfigError

# Variables DJL Serving reads for its JVM or model-loading that have no meaning for lmserve.
IGNORED_SERVING_ENV = ("SERVING_OPTS", "SERVING_FEATURES", "SERVING_LOAD_MODELS")
_SHORTCUTS = {key.shortcut: key for key in KEYS if key.shortcut}
_OPTION_NAMES = tuple(name for key in KEYS if key.honoured for name in key.names if name.startswith("option."))


class Level(IntEnum):
    """Precedence of a source; higher wins. As in DJL Serving, ``SERVING_*`` variables are
    server-wide defaults that any model's own configuration overrides."""

    SERVING_ENV = 1
    OPTION_ENV = 2
    PROPERTIES = 3
    CLI = 4


@dataclass(frozen=True)
class Setting:
    """One raw value for one key, with where it came from."""

    key: Key
    raw: object
    source: str  # e.g. "env OPTION_DTYPE", "model/serving.properties line 3", "CLI --dtype"
    level: Level
    rank: int  # 0 = canonical spelling, then aliases, then the env shortcut

    @property
    def spelling(self) -> str:
        """The key name as the user wrote it (an alias stays an alias; a shortcut names its key)."""
        names = self.key.names
        return names[self.rank] if self.rank < len(names) else self.key.name


@dataclass(frozen=True)
class Unknown:
    """A key no entry of the table spells, and the honoured key it most looks like."""

    name: str  # as a key: OPTION_FOO is option.foo
    raw: object
    source: str
    guess: str | None  # the closest honoured key, spelled for the same source

    def hint(self) -> str:
        return f"did you mean {self.guess}?" if self.guess else "see the key reference"


@dataclass
class Gathered:
    """Everything the sources say, before anything is resolved or parsed."""

    settings: list[Setting] = field(default_factory=list)
    unknown: list[Unknown] = field(default_factory=list)
    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, name: str, raw: object, source: str, level: Level, *, env_prefix: str = "",
            pool: tuple[str, ...] | None = None) -> Setting | None:
        """Record ``name=raw`` from ``source``; an unknown name is kept in ``unknown`` with the
        closest honoured key (spelled for ``env_prefix`` when it came from the environment)."""
        found = find_key(name)
        if found is None:
            guess = closest_key(name, pool)
            if guess and env_prefix:
                guess = _env_spelling(env_prefix, guess)
            self.unknown.append(Unknown(name, raw, source, guess))
            return None
        setting = Setting(found[0], raw, source, level, found[1])
        self.settings.append(setting)
        return setting


def from_properties(props: PropertiesFile, into: Gathered) -> None:
    """Settings of a parsed ``serving.properties``; server keys are refused there. Beside a custom
    handler, unknown ``option.*`` keys are the handler's own settings: they are left to it (it reads
    them at initialisation), as the managed containers do."""
    into.warnings.extend(props.warnings)
    handler_owned = _beside_custom_handler(props)
    for entry in props.entries:
        if handler_owned and entry.key.lower().startswith("option.") and find_key(entry.key) is None:
            continue
        setting = into.add(entry.key, entry.value, entry.source, Level.PROPERTIES)
        if setting is not None and setting.key.scope == "server":
            into.settings.remove(setting)
            into.errors.append(ConfigError(
                setting.key.name, entry.value,
                f"server settings come from SERVING_{setting.key.name.upper()} or "
                f"{setting.key.flag or 'the CLI'}, not from a model's serving.properties", entry.source,
            ))  # fmt: skip


def _beside_custom_handler(props: PropertiesFile) -> bool:
    """A ``model.py`` next to the file, or an ``option.entryPoint`` naming a file or a function."""
    entry = next((e.value.strip() for e in props.entries if e.key.lower() == "option.entrypoint"), "")
    if entry.endswith(".py") or ":" in entry:
        return True
    return (Path(props.origin).parent / "model.py").is_file()


def from_option_env(env: Mapping[str, str], into: Gathered) -> None:
    """``OPTION_<NAME>`` (as ``option.<name>``, any case) and the shortcut variables."""
    for var, value in env.items():
        upper, source = var.upper(), f"env {var}"
        if upper in _SHORTCUTS:
            key = _SHORTCUTS[upper]
            into.settings.append(Setting(key, value, source, Level.OPTION_ENV, len(key.names)))
        elif upper.startswith("OPTION_"):
            name = "option." + var[len("OPTION_") :].lower()
            into.add(name, value, source, Level.OPTION_ENV, env_prefix="OPTION_", pool=_OPTION_NAMES)


def from_serving_env(env: Mapping[str, str], into: Gathered) -> None:
    """``SERVING_<KEY>``: ``SERVING_OPTION_<NAME>`` is ``option.<name>``, any other ``SERVING_<NAME>``
    is the key ``<name>`` (any case), e.g. SERVING_PORT, SERVING_MINWORKERS, SERVING_BATCH_SIZE;
    a dotted key has its first dot written as ``_`` (SERVING_GPU_MINWORKERS is gpu.minWorkers)."""
    for var, value in env.items():
        upper, source = var.upper(), f"env {var}"
        if not upper.startswith("SERVING_"):
            continue
        if upper in IGNORED_SERVING_ENV:
            into.warnings.append(f"{var} ignored: a DJL Serving launcher setting with no meaning in lmserve")
            continue
        name = var[len("SERVING_") :].lower()
        dotted = name.replace("_", ".", 1)  # SERVING_OPTION_DTYPE, SERVING_GPU_MINWORKERS
        if find_key(name) is None and (find_key(dotted) is not None or name.startswith("option_")):
            name = dotted
        into.add(name, value, source, Level.SERVING_ENV, env_prefix="SERVING_")


def from_cli(cli: Mapping[str, object], flags: Mapping[str, str], into: Gathered) -> None:
    """Settings from CLI overrides keyed by key spelling; None values mean "flag not given".
    ``flags`` maps a key's canonical name to the flag that set it, for error messages."""
    for name, value in cli.items():
        if value is None:
            continue
        found = find_key(name)
        source = f"CLI {flags[found[0].name]}" if found and found[0].name in flags else f"CLI --option {name}"
        into.add(name, value, source, Level.CLI)


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


def _env_spelling(prefix: str, name: str) -> str:
    """How key ``name`` is written as an environment variable with ``prefix``."""
    if prefix == "OPTION_":
        return prefix + name[len("option.") :].upper()
    return prefix + name.replace(".", "_").upper()
