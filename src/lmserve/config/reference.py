"""The key reference as Markdown, rendered from the key table so the docs cannot drift from it."""

from __future__ import annotations

import dataclasses

from lmserve.config.keys import KEYS, Key
from lmserve.config.settings import (
    BatchingConfig,
    EngineConfig,
    ModelSpec,
    ServerConfig,
    WorkerConfig,
)

_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "engine": EngineConfig,
    "batching": BatchingConfig,
    "workers": WorkerConfig,
    "server": ServerConfig,
}

_PRECEDENCE = (
    "Precedence, highest first: CLI flags (and `--option KEY=VALUE`) > `SERVING_*` env > "
    "`serving.properties` > `OPTION_*` env and the shortcut variables > defaults."
)


def default_of(key: Key) -> str:
    """The default of ``key`` as shown in the reference: the dataclass field default."""
    if key.default_text is not None:
        return key.default_text
    if key.field is None:
        return "unset"
    section, attribute = key.field.split(".")
    field = {f.name: f for f in dataclasses.fields(_SECTIONS[section])}[attribute]
    if field.default is dataclasses.MISSING:
        return "required"
    return _show(field.default)


def _show(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _env_names(key: Key) -> str:
    if key.scope == "server":
        names = [f"SERVING_{key.name.upper()}"]
    elif key.name.startswith("option."):
        suffix = key.name[len("option.") :].upper()
        names = [f"OPTION_{suffix}", f"SERVING_OPTION_{suffix}"]
    else:
        names = [f"SERVING_{key.name.upper()}"]
    if key.shortcut:
        names.append(key.shortcut)
    return ", ".join(f"`{name}`" for name in names)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_keys_markdown() -> str:
    """A Markdown reference of every key: what it sets, allowed values, defaults, flag and env."""
    lines = [
        "## Configuration keys",
        "",
        _PRECEDENCE,
        "",
        "| key | aliases | allowed | default | CLI flag | environment | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in KEYS:
        if key.ignored:
            continue
        aliases = ", ".join(f"`{alias}`" for alias in key.aliases)
        flag = f"`{key.flag}`" if key.flag else ""
        row = (f"`{key.name}`", aliases, key.type.allowed, f"`{default_of(key)}`", flag,
               _env_names(key), key.doc)  # fmt: skip
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    lines += [
        "",
        "## Accepted and ignored keys",
        "",
        "These keys are accepted so LMI configurations run unchanged; each one given leaves one warning.",
        "",
        "| key | why it is ignored |",
        "|---|---|",
    ]
    lines += [f"| `{key.name}` | {_cell(str(key.ignored))} |" for key in KEYS if key.ignored]
    return "\n".join(lines) + "\n"
