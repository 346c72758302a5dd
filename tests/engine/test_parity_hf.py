"""Greedy output equals Hugging Face ``generate`` token for token, however the engine batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.tiny_models import VOCAB_SIZE, hf_greedy, make_tiny_model

NEW_TOKENS = 16
PROMPT_LENGTHS = (3, 11, 29, 50, 7)

MODES = {
    "default": {},
    # A 16-token step budget splits the longer prompts into chunks and mixes them with decodes (the
    # budget is never below max_num_seqs, whose default 64 would leave most prompts whole).
    "chunked-prefill": {"max_num_batched_tokens": 16, "max_num_seqs": 8},
    # 18 blocks of 4 tokens: the three shorter prompts are admitted, then outgrow the cache together,
    # so the most recently admitted is preempted and later recomputed.
    "preemption": {"kv_cache_tokens": 72, "block_size": 4},
}


@pytest.fixture(scope="module", params=["llama", "llama-tied-mha", "mistral", "qwen2"])
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 tokenizer_dir: Path) -> tuple[Path, list[list[int]], list[list[int]]]:
    path = tmp_path_factory.mktemp(request.param)
    hf_model = make_tiny_model(path, request.param, tokenizer_dir)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    expected = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    return path, prompts, expected


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_hugging_face(family_model, mode: str) -> None:
    path, prompts, expected = family_model
    llm = LLM(str(path), dtype="fp32", **MODES[mode])
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)
    stats = llm.engine.stats()
    if mode == "preemption":
        assert stats.num_preempted_total > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total  # everything returned to the pool


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_stays_close_to_fp32(family_model, dtype: str) -> None:
    """16-bit weights and cache change numerics a little; the first tokens should still agree."""
    path, prompts, expected = family_model
    llm = LLM(str(path), dtype=dtype)
    assert llm.engine.runner.kv_spec.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    agree = sum(o.token_ids[0] == e[0] for o, e in zip(outputs, expected, strict=True))
    assert agree >= len(prompts) - 1


@pytest.mark.parametrize("kernel", ["own", "own-dot", "torch-bf16"])
def test_each_linear_kernel_stays_close_to_fp32(family_model, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever linear kernel the per-machine choice picks, bf16 output means the same: every
    candidate forced in turn agrees with fp32 on the first token of all prompts but at most one (a
    near-tie may part under any change of rounding or accumulation order)."""
    from lmserve.kernels.build import load_cpu_kernels
    from lmserve.kernels.machine import cpu_flags

    if kernel == "own-dot" and ("avx512_bf16" not in cpu_flags() or not hasattr(load_cpu_kernels(), "linear_dot")):
        pytest.skip("the bf16 dot-product kernel needs AVX512_BF16 and the AVX-512 build")
    path, prompts, expected = family_model
    monkeypatch.setenv("LMSERVE_LINEAR_KERNEL", kernel)
    llm = LLM(str(path), dtype="bf16")
    assert llm.engine.runner.kernel_choice.forced == kernel
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))
    agree = sum(o.token_ids[0] == e[0] for o, e in zip(outputs, expected, strict=True))
    assert agree >= len(prompts) - 1
