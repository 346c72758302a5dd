"""The key reference rendered from the key table."""

from __future__ import annotations

import re

from lmserve.config import KEYS, render_keys_markdown


def test_reference_lists_every_key_with_its_flag_and_env_names() -> None:
    text = render_keys_markdown()
    for key in KEYS:
        assert f"`{key.name}`" in text
        if key.flag:
            assert f"`{key.flag}`" in text
    assert "`OPTION_TENSOR_PARALLEL_DEGREE`" in text and "`TENSOR_PARALLEL_DEGREE`" in text
    assert "`SERVING_API_KEY`" in text


def test_reference_shows_dataclass_defaults() -> None:
    first_table = render_keys_markdown().split("\n\n## ")[0]
    rows = {line.split(" | ")[0]: line for line in first_table.splitlines()}
    assert "`8080`" in rows["| `port`"]
    assert "`1000`" in rows["| `job_queue_size`"]
    assert "`true`" in rows["| `option.enable_prefix_caching`"]


def test_reference_tables_have_the_same_cell_count_in_every_row() -> None:
    tables: list[list[int]] = [[]]
    for line in render_keys_markdown().splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]  # split on pipes not escaped
            tables[-1].append(len(cells))
        elif tables[-1]:
            tables.append([])
    assert [set(table) for table in tables if table] == [{7}, {3}]


def test_every_spelling_is_listed_with_what_lmserve_does_and_the_text_it_says() -> None:
    text = render_keys_markdown()
    lmi = text[text.index("## What lmserve does with each LMI key"):]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lmi.splitlines() if line.startswith("| `")}
    for key in KEYS:
        row = rows[f"`{key.name}`"]
        if key.refused:
            assert "| refused |" in row and key.refused in row
        elif key.ignored:
            assert "| ignored |" in row and key.ignored in row
        else:
            assert "| honoured |" in row or "| honoured, with a warning |" in row
        for alias in key.aliases:
            assert "| mapped |" in rows[f"`{alias}`"] and f"same as `{key.name}`" in rows[f"`{alias}`"]
