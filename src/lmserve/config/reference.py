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
    "Precedence, highest first: CLI flags (and `--option KEY=VALUE`) > `serving.properties` > "
    "`OPTION_*` env and the shortcut variables > `SERVING_*` env > defaults. As in DJL Serving, "
    "`SERVING_*` variables are server-wide defaults that a model's own configuration overrides."
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
        names = [f"SERVING_{key.name.replace('.', '_').upper()}"]
    elif key.name.startswith("option."):
        suffix = key.name[len("option.") :].upper()
        names = [f"OPTION_{suffix}", f"SERVING_OPTION_{suffix}"]
    else:
        names = [f"SERVING_{key.name.replace('.', '_').upper()}"]
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
        if not key.honoured:
            continue
        aliases = ", ".join(f"`{alias}`" for alias in key.aliases)
        flag = f"`{key.flag}`" if key.flag else ""
        row = (f"`{key.name}`", aliases, key.type.allowed, f"`{default_of(key)}`", flag,
               _env_names(key), key.doc)  # fmt: skip
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    lines += [
        "",
        "## What lmserve does with each LMI key",
        "",
        "Every spelling lmserve knows: *honoured* (it acts on it), *mapped* (another spelling of a key "
        "it honours), *ignored* (accepted with one warning line, quoted here), *refused* (a feature "
        "not built yet: an error, unless the value turns it off). Any other key is an error that "
        "suggests the closest honoured key, or a warning with `option.strict_config=false`.",
        "",
        "| key | lmserve | what happens |",
        "|---|---|---|",
    ]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for key in KEYS for row in treatment(key)]
    return "\n".join(lines) + "\n"


def treatment(key: Key) -> list[tuple[str, str, str]]:
    """(spelling, verdict, what happens) for each spelling of ``key``, as the reference and
    ``lmserve config check`` state them."""
    if key.refused:
        unless = f" (accepted: {', '.join(key.accepts)})" if key.accepts else ""
        rows = [(f"`{key.name}`", "refused", f"error: {key.refused}{unless}")]
    elif key.ignored:
        rows = [(f"`{key.name}`", "ignored", f"warning: ignored: {key.ignored}")]
    else:
        target = f"sets `{key.field}`" if key.field else key.doc
        verdict = "honoured"
        notes = [f"warning{_for_values(note.values)}: {note.text}" for note in key.notes]
        if any(not note.values for note in key.notes):
            verdict = "honoured, with a warning"
        rows = [(f"`{key.name}`", verdict, "; ".join([target, *notes]))]
    rows += [(f"`{alias}`", "mapped", f"same as `{key.name}`") for alias in key.aliases]
    return rows


def _for_values(values: tuple[str, ...]) -> str:
    return f" when {' or '.join(values)}" if values else ""
