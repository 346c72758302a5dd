"""The families on CUDA: fp32 parity with Hugging Face, bf16 close to it, conversions, NCCL groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.parallel.helpers import close
from tests.tiny_models import VOCAB_SIZE, hf_greedy, make_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("private_cache")]

FAMILIES = ["llama-gqa-9x3", "gpt2", "gptj", "gpt_neox", "opt-proj-postln", "bloom"]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           tokenizer_dir: Path) -> tuple[Path, list[list[int]], list[list[int]]]:
    path = tmp_path_factory.mktemp(request.param)
    model = make_tiny_model(path, request.param, tokenizer_dir)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in (3, 11, 29, 50)]
    return path, prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts]


def _generate(path: Path, prompts: list[list[int]], **kwargs: object) -> list[list[int]]:
    llm = LLM(str(path), device="cuda", kv_cache_tokens=2048, **kwargs)
    try:
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        close(llm)
    return [o.token_ids for o in outs]


def test_cuda_fp32_matches_hugging_face(family: tuple[Path, list, list]) -> None:
    path, prompts, expected = family
    assert _generate(path, prompts, dtype="fp32") == expected


def test_cuda_bf16_from_a_conversion_stays_close(family: tuple[Path, list, list]) -> None:
    """bf16 (converted once, cached, then loaded from the cache) agrees on the first tokens."""
    path, prompts, expected = family
    first = _generate(path, prompts, dtype="bf16")
    again = _generate(path, prompts, dtype="bf16")  # now from the cached conversion
    assert first == again
    assert sum(got[0] == want[0] for got, want in zip(first, expected, strict=True)) >= len(prompts) - 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_tensor_parallel_over_nccl_matches_hugging_face(family: tuple[Path, list, list]) -> None:
    path, prompts, expected = family
    assert _generate(path, prompts, dtype="fp32", tensor_parallel_degree=2) == expected
