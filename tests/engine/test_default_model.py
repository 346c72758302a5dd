"""The default model, end to end: fetched, imported from GGUF, and answering a real question."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve import LLM, SamplingParams

pytestmark = [pytest.mark.default_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def llm(default_model_dir: Path) -> LLM:
    return LLM(str(default_model_dir), dtype="bf16", max_model_len=1024)


def test_knows_the_capital_of_france(llm: LLM) -> None:
    (out,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(max_new_tokens=40))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ends at the end-of-turn token, not the length limit


def test_default_model_is_used_when_none_is_named(default_model_dir: Path) -> None:
    from lmserve.engine.llm import resolve_model_dir

    assert resolve_model_dir(None) == default_model_dir
