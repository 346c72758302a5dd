"""docs/configuration.md is the rendered key table, so the page never drifts from the code."""

from __future__ import annotations

from pathlib import Path

from lmserve.config import render_keys_markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_page_lists_every_key_as_the_table_does() -> None:
    rendered = render_keys_markdown().splitlines()
    page = PAGE.read_text().splitlines()
    table = [line for line in rendered if line.startswith("|")]
    assert table and table == [line for line in page if line.startswith("|")], (
        "docs/configuration.md is stale: regenerate it with lmserve.config.render_keys_markdown()")


def test_configuration_page_documents_config_check() -> None:
    page = PAGE.read_text()
    assert "## Using `lmserve config check`" in page and "OPTION_*" in page
