"""serving.properties parsing: the Java properties forms LMI users write."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.config import parse_properties, read_properties
from lmserve.errors import ConfigError


def as_dict(text: str) -> dict[str, str]:
    return {entry.key: entry.value for entry in parse_properties(text).entries}


def test_equals_colon_and_space_separators_with_whitespace_trimmed() -> None:
    text = "a=1\n  b = 2  \nc: 3\nd 4\n\te\t=\t5\t\n"
    assert as_dict(text) == {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}


def test_comments_and_blank_lines_are_skipped() -> None:
    text = "# a comment\n! another\n\n   \n   # indented comment\nkey=value # not a comment\n"
    assert as_dict(text) == {"key": "value # not a comment"}


def test_value_keeps_later_separators_and_urls() -> None:
    text = "option.model_id=s3://bucket/path\noption.x = a=b:c\n"
    assert as_dict(text) == {"option.model_id": "s3://bucket/path", "option.x": "a=b:c"}


def test_later_duplicate_wins_with_a_warning_naming_both_lines() -> None:
    parsed = parse_properties("option.dtype=fp16\nother=1\noption.dtype=bf16\n", "m/serving.properties")
    assert {e.key: e.value for e in parsed.entries}["option.dtype"] == "bf16"
    assert len(parsed.warnings) == 1
    warning = parsed.warnings[0]
    assert "option.dtype" in warning and "line 1" in warning and "line 3" in warning


def test_each_entry_records_file_and_line() -> None:
    parsed = parse_properties("\n# c\nengine=Python\n", "model/serving.properties")
    assert parsed.entries[0].source == "model/serving.properties line 3"


def test_backslash_continues_a_line_and_escapes_are_decoded() -> None:
    text = "option.context_length_estimate = 256,\\\n    512,\\\n    1024\nname=\\u0041b\\tc\n"
    assert as_dict(text) == {"option.context_length_estimate": "256,512,1024", "name": "Ab\tc"}


def test_escaped_separator_belongs_to_the_key() -> None:
    assert as_dict("a\\=b=c\n") == {"a=b": "c"}


def test_windows_line_endings_and_missing_value() -> None:
    assert as_dict("a=1\r\nb\r\nc=\r\n") == {"a": "1", "b": "", "c": ""}


def test_bad_unicode_escape_names_the_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_properties("ok=1\nbad=\\u12\n", "serving.properties")
    assert "serving.properties line 2" in str(err.value)


def test_empty_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="line 1"):
        parse_properties("=value\n")


def test_read_properties_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        read_properties(tmp_path / "nope.properties")
    assert "nope.properties" in str(err.value)
