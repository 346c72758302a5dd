"""Every family generates Hugging Face's greedy tokens, on one rank and split over 2 and 4 ranks.

Random tiny checkpoints in fp32, compared with ``generate``. Degrees are those the family's 4 query heads allow,
plus SmolLM's head shape (9 query heads on 3 KV heads) at the uneven degree 2 and at 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.parallel.helpers import close
from tests.tiny_models import VOCAB_SIZE, hf_greedy, make_tiny_model

pytestmark = pytest.mark.usefixtures("private_cache")

NEW_TOKENS = 12
PROMPT_LENGTHS = (3, 11, 29, 50)

FAMILY_DEGREES = {
    "gpt2": (1, 2, 4),
    "gptj": (1, 2, 4),
    "gpt_neox": (1, 2, 4),
    "gpt_neox-sequential": (1, 2),
    "opt": (1, 2, 4),
    "opt-proj-postln": (1, 2),
    "bloom": (1, 2, 4),
    "llama-gqa-9x3": (1, 2, 3),
    "mistral": (2, 4),  # one KV head, replicated on every rank
    "llama": (2, 4),
}
# More than two ranks on a small shared machine is slow-ish (about 5 s a case): marked slow.
CASES = [pytest.param(family, degree, id=f"{family}-tp{degree}", marks=[pytest.mark.slow] if degree > 2 else [])
         for family, degrees in FAMILY_DEGREES.items() for degree in degrees]


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, tuple[Path, list, list]]:
    """Per family: its checkpoint, the prompts, and Hugging Face's continuations (built lazily)."""

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, family: str) -> tuple[Path, list, list]:
            path = tmp_path_factory.mktemp(family)
            model = make_tiny_model(path, family, tokenizer_dir)
            gen = torch.Generator().manual_seed(1)
            prompts = [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
            self[family] = (path, prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts])
            return self[family]

    return Lazy()


@pytest.mark.parametrize(("family", "degree"), CASES)
def test_greedy_matches_hugging_face(expected: dict, family: str, degree: int) -> None:
    path, prompts, want = expected[family]
    llm = LLM(str(path), dtype="fp32", tensor_parallel_degree=degree, kv_cache_tokens=1024)
    try:
        outputs = llm.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        close(llm)
    assert [o.token_ids for o in outputs] == want


@pytest.mark.parametrize("mode", [{"max_num_batched_tokens": 16, "max_num_seqs": 4}, {"kv_cache_tokens": 72, "block_size": 4}],
                         ids=["chunked-prefill", "preemption"])
def test_uneven_split_through_chunked_prefill_and_preemption(expected: dict, mode: dict) -> None:
    path, prompts, want = expected["llama-gqa-9x3"]
    llm = LLM(str(path), dtype="fp32", tensor_parallel_degree=2, **{"kv_cache_tokens": 1024, **mode})
    try:
        outputs = llm.generate(prompts[:3], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        stats = llm.engine.stats()
    finally:
        close(llm)
    assert [o.token_ids for o in outputs] == want[:3]
    if "block_size" in mode:
        assert stats.num_preempted_total > 0


def test_bare_model_checkpoints_load_too(tmp_path: Path, expected: dict) -> None:
    """Checkpoints saved from the bare model (gpt2, bigscience/bloom-*, facebook/opt-*) lack the
    causal-LM prefix; the weight maps accept both spellings."""
    from safetensors.torch import load_file, save_file

    for family, prefix in (("gpt2", "transformer."), ("bloom", "transformer."), ("opt", "model.")):
        path, prompts, want = expected[family]
        bare = tmp_path / family
        bare.mkdir()
        for item in path.iterdir():
            if item.name != "model.safetensors":
                (bare / item.name).write_bytes(item.read_bytes())
        tensors = load_file(str(path / "model.safetensors"))
        save_file({k.removeprefix(prefix): v for k, v in tensors.items()}, str(bare / "model.safetensors"))
        llm = LLM(str(bare), dtype="fp32", kv_cache_tokens=1024)
        outputs = llm.generate(prompts[:2], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        assert [o.token_ids for o in outputs] == want[:2], family


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "opt", "bloom", "llama"])
def test_every_layer_is_called_without_torchs_hook_machinery(tmp_path: Path, tokenizer_dir: Path,
                                                             family: str) -> None:
    """Each family's layers derive from ``lmserve.kernels.Module``, whose call is its ``forward``:
    torch's per-call hook checks were a tenth of a small model's single-stream decode step. A
    family (or a new layer) built on plain ``nn.Module`` would quietly bring that cost back."""
    from lmserve.kernels import Module
    from lmserve.models.checkpoint import describe_checkpoint

    make_tiny_model(tmp_path, family, tokenizer_dir)
    model = describe_checkpoint(tmp_path, torch.float32, torch.device("cpu")).empty_model()
    plain = sorted({type(m).__name__ for m in model.modules()
                    if not isinstance(m, Module | torch.nn.ModuleList)})  # fmt: skip
    assert plain == []
