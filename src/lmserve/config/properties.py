"""Reading ``serving.properties``: the Java properties format DJL Serving uses.

Supported, as in ``java.util.Properties``: ``key=value``, ``key: value`` and ``key value``;
``#`` and ``!`` comment lines; blank lines; a line ending in an odd number of backslashes continues
on the next; escapes ``\\t \\n \\r \\f \\uXXXX`` and ``\\x`` for any other ``x``. Unlike Java,
trailing whitespace of a value is trimmed too. A key given twice keeps its later value and leaves a
warning. Keys are returned as written; the loader matches them against the key table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmserve.errors import ConfigError

_SPACE = " \t\f"
_SEPARATORS = "=:"
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


@dataclass(frozen=True)
class Property:
    """One ``key=value`` entry and where it was written."""

    key: str
    value: str
    source: str  # "<file> line <n>", for error messages


@dataclass(frozen=True)
class PropertiesFile:
    """The entries of one properties file, each key once (the last one written wins)."""

    origin: str
    entries: tuple[Property, ...]
    warnings: tuple[str, ...] = ()


def read_properties(path: Path) -> PropertiesFile:
    """Parse the properties file at ``path``; ConfigError when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("properties", str(path), f"a readable UTF-8 properties file ({exc})") from exc
    return parse_properties(text, str(path))


def parse_properties(text: str, origin: str = "serving.properties") -> PropertiesFile:
    """Parse properties ``text``; ``origin`` names the file in sources and warnings."""
    entries: dict[str, Property] = {}
    warnings: list[str] = []
    for number, line in _logical_lines(text):
        source = f"{origin} line {number}"
        key, value = _split(line, source)
        if key in entries:
            earlier = entries.pop(key)
            warnings.append(
                f"{key} is set twice in {origin}: {earlier.source} ({earlier.value!r}) is replaced "
                f"by line {number} ({value!r})"
            )
        entries[key] = Property(key, value, source)
    return PropertiesFile(origin, tuple(entries.values()), tuple(warnings))


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, joined text) of each non-blank, non-comment logical line."""
    natural = text.splitlines()
    index = 0
    while index < len(natural):
        start = index
        line = natural[index].lstrip(_SPACE)
        index += 1
        if not line or line[0] in "#!":
            continue
        while _continues(line) and index < len(natural):
            line = line[:-1] + natural[index].lstrip(_SPACE)
            index += 1
        if _continues(line):  # a continuation on the last line continues into nothing
            line = line[:-1]
        yield start + 1, line


def _continues(line: str) -> bool:
    trailing = len(line) - len(line.rstrip("\\"))
    return trailing % 2 == 1


def _split(line: str, source: str) -> tuple[str, str]:
    """Split a logical line into unescaped, trimmed key and value."""
    end = 0
    while end < len(line) and line[end] not in _SEPARATORS + _SPACE:
        end += 2 if line[end] == "\\" else 1
    end = min(end, len(line))
    rest = line[end:].lstrip(_SPACE)
    if rest[:1] and rest[0] in _SEPARATORS:
        rest = rest[1:].lstrip(_SPACE)
    key = _unescape(line[:end], source)
    if not key:
        raise ConfigError("(empty key)", line, "lines of the form key=value", source)
    return key, _unescape(rest, source).strip()


def _unescape(text: str, source: str) -> str:
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\" or index + 1 == len(text):
            out.append(char)
            index += 1
            continue
        code = text[index + 1]
        if code == "u":
            digits = text[index + 2 : index + 6]
            if len(digits) != 4 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise ConfigError("(escape)", text, "\\u followed by four hex digits", source)
            out.append(chr(int(digits, 16)))
            index += 6
        else:
            out.append(_ESCAPES.get(code, code))
            index += 2
    return "".join(out)
