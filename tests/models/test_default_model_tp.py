"""The default model (SmolLM2-135M: 9 query heads on 3 KV heads) split over 3 ranks, and unevenly
over 2 (query heads 5 + 4), still answers a real question. Default kernels, bf16, the user's cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve import LLM, SamplingParams
from tests.parallel.helpers import close

pytestmark = [pytest.mark.default_model, pytest.mark.slow]


@pytest.mark.parametrize("degree", [3, 2])
def test_knows_the_capital_of_france_split_over_ranks(default_model_dir: Path, degree: int) -> None:
    llm = LLM(str(default_model_dir), dtype="bf16", max_model_len=1024, tensor_parallel_degree=degree)
    try:
        (out,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                          SamplingParams(max_new_tokens=40))
    finally:
        close(llm)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
