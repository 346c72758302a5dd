"""``lmserve config check``: what a configuration means to lmserve, without loading the model.

The input is a model directory (its ``serving.properties``), a ``serving.properties`` file, or an
environment file of ``OPTION_*``/``SERVING_*`` lines (``KEY=VALUE``, optionally ``export KEY=VALUE``).
The report lists every key as given, what it maps to (or that it is ignored, refused, unknown or
overridden), then every warning and every error at once: the same analysis ``lmserve serve`` runs
(``analyse_config``), so a configuration the check passes starts. The process environment is not
read, so the report depends only on the file.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmserve.config.keys import Key
from lmserve.config.load import PROPERTIES_FILE, Analysis, analyse_config
from lmserve.config.properties import read_properties
from lmserve.config.sources import Setting
from lmserve.config.values import TENSOR_PARALLEL_MAX
from lmserve.errors import ConfigError

_ENV_NAME = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)")
_ENV_PREFIXES = ("OPTION_", "SERVING_", "HF_", "TENSOR_PARALLEL_DEGREE", "MAX_BATCH_SIZE", "MAX_CONCURRENT_REQUESTS")


def check_config(path: Path) -> tuple[str, bool]:
    """(the report, True when ``lmserve serve`` would accept the configuration) for ``path``."""
    env = read_env_file(path) if path.is_file() else None
    if env is not None:
        kind, analysis = "environment file", analyse_config(None, env=env)
        order = [f"env {name}" for name in env]
    else:
        props = path / PROPERTIES_FILE if path.is_dir() else path
        if not props.is_file():
            raise ConfigError("path", str(path), f"a model directory holding {PROPERTIES_FILE}, a properties "
                              "file or an OPTION_* environment file")  # fmt: skip
        kind = PROPERTIES_FILE
        analysis = analyse_config(str(props.parent), env={}, properties=props)
        order = [entry.source for entry in read_properties(props).entries]
    lines = [f"{path} ({kind}):", ""]
    lines += [line for _, line in sorted(_key_lines(analysis), key=lambda item: _position(item[0], order))]
    lines += _section("warnings", list(analysis.warnings))
    lines += _section("errors", [str(error) for error in analysis.errors])
    ok = not analysis.errors
    lines += ["", "OK: lmserve serve accepts this configuration" if ok
              else f"{len(analysis.errors)} error(s): lmserve serve refuses this configuration"]  # fmt: skip
    return "\n".join(lines) + "\n", ok


def read_env_file(path: Path) -> dict[str, str] | None:
    """The variables of an environment file, or None when ``path`` is not one (a properties file)."""
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_NAME.fullmatch(line)
        if match is None or not match.group(1).upper().startswith(_ENV_PREFIXES):
            return None
        env[match.group(1)] = match.group(2).strip().strip("'\"")
    return env or None


def _key_lines(analysis: Analysis) -> list[tuple[str, str]]:
    """(source, line) for every key given, known or not."""
    out = [(s.source, f"  {s.spelling} = {s.raw}  [{s.source}]\n      -> {_verdict(s, analysis)}")
           for s in analysis.settings]  # fmt: skip
    out += [(u.source, f"  {u.name} = {u.raw}  [{u.source}]\n      -> unknown key: {u.hint()}")
            for u in analysis.unknown]  # fmt: skip
    return out


def _verdict(setting: Setting, analysis: Analysis) -> str:
    key = setting.key
    winner = analysis.winners.get(key.name)
    if winner is not setting:
        return f"overridden by {winner.source if winner else 'another setting'}"
    alias = f"same as {key.name}: " if setting.spelling != key.name else ""
    if key.refused:
        return f"refused: {key.refused}" if _failed(setting, analysis) else "accepted: the value turns it off"
    if key.ignored:
        return f"ignored: {key.ignored}"
    if key.name not in analysis.values:
        return "bad value (see errors)"
    warned = " (see warnings)" if any(note.applies(setting.raw) for note in key.notes) else ""
    return alias + _meaning(key, analysis.values[key.name]) + warned


def _failed(setting: Setting, analysis: Analysis) -> bool:
    return any(error.key == setting.spelling and error.source == setting.source for error in analysis.errors)


def _meaning(key: Key, value: object) -> str:
    if key.field is None:
        return f"{value!r}: {key.doc}"
    if key.name == "option.tensor_parallel_degree" and value == TENSOR_PARALLEL_MAX:
        return f"{key.field} = max: every visible GPU on CUDA, 1 on the CPU (resolved at start)"
    return f"{key.field} = {value!r}"


def _section(title: str, items: list[str]) -> list[str]:
    return ["", f"{title} ({len(items)}):", *(f"  {item}" for item in items)] if items else []


def _position(source: str, order: list[str]) -> int:
    return order.index(source) if source in order else len(order)
