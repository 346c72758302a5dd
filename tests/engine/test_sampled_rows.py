"""A prompt's last layer finishes only the rows a step samples from, and nothing a user sees changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.models.layers import SampledRows
from lmserve.models.llama import LlamaForCausalLM
from tests.tiny_models import FAMILIES, VOCAB_SIZE, hf_greedy, make_tiny_model


def test_sampled_rows_are_found_only_where_they_end_their_sequences() -> None:
    starts = torch.tensor([0, 5, 6, 9], dtype=torch.int32)  # three sequences: 5, 1 and 3 new tokens
    tables = torch.tensor([[1, 2], [3, 0], [4, 5]], dtype=torch.int32)
    lens = torch.tensor([5, 40, 12], dtype=torch.int32)
    rows = SampledRows.of(torch.tensor([4, 8]), starts, tables, lens)  # the first and the third end here
    assert rows is not None
    assert rows.rows.tolist() == [4, 8] and rows.context_lens.tolist() == [5, 12]
    assert rows.block_tables.tolist() == [[1, 2], [4, 5]] and rows.query_start_loc.tolist() == [0, 1, 2]
    empty = SampledRows.of(torch.tensor([], dtype=torch.long), starts, tables, lens)  # mid-prompt chunks only
    assert empty is not None and empty.rows.numel() == 0 and empty.query_start_loc.tolist() == [0]
    assert SampledRows.of(torch.tensor([3, 4]), starts, tables, lens) is None  # prompt logprobs: row 3 is not last
    decode = torch.arange(4, dtype=torch.int32)
    assert SampledRows.of(torch.arange(3), decode, tables, lens) is None  # every row is sampled: nothing to save


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model(path, "llama", tokenizer_dir, num_hidden_layers=3)
    return path


def _mlp_rows(llm: LLM) -> tuple[list[int], list[int]]:
    """Rows the first and the last layer's MLP see, call by call."""
    layers = llm.engine.runner.model.model.layers
    seen: tuple[list[int], list[int]] = ([], [])
    for layer, log in ((layers[0], seen[0]), (layers[-1], seen[1])):
        forward = layer.mlp.forward
        layer.mlp.forward = lambda x, forward=forward, log=log: (log.append(x.shape[0]), forward(x))[1]
    return seen


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in (29, 50, 7)]


def test_the_last_layer_finishes_only_sampled_rows_with_the_same_tokens(model_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=0)
    # A 16-token budget cuts the prompts into chunks: steps whose rows are all mid-prompt sample nothing.
    pruned = LLM(str(model_path), dtype="fp32", max_num_batched_tokens=16, max_num_seqs=4)
    first, last = _mlp_rows(pruned)
    got = pruned.generate(_prompts(), params)
    assert sum(first) == sum(len(p) for p in _prompts()) + 3 * 5  # every prompt token and every decode
    assert sum(last) == 3 * 6  # one row per generated token: the prompts' other rows stop at their keys and values
    first.clear(), last.clear()
    pruned.generate([list(range(3, 43))], SamplingParams(max_new_tokens=1))  # 40 new tokens, 16 a step
    assert first == [16, 16, 8] and last == [0, 0, 1]  # mid-prompt steps run no last-layer MLP rows at all

    monkeypatch.setattr(LlamaForCausalLM, "finishes_sampled_rows_only", False)
    full = LLM(str(model_path), dtype="fp32", max_num_batched_tokens=16, max_num_seqs=4)
    first_full, last_full = _mlp_rows(full)
    want = full.generate(_prompts(), params)
    assert last_full == first_full  # without it every row runs through every layer
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want, strict=True):
        assert [lp.logprob for lp in g.logprobs or []] == pytest.approx([lp.logprob for lp in w.logprobs or []],
                                                                         abs=1e-4)


def test_prompt_logprobs_still_score_every_prompt_row(model_path: Path) -> None:
    llm = LLM(str(model_path), dtype="fp32")
    first, last = _mlp_rows(llm)
    prompt = _prompts()[0]
    (out,) = llm.generate([prompt], SamplingParams(max_new_tokens=1, prompt_logprobs=0, ignore_eos=True))
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt) - 1
    assert last == first == [len(prompt)]  # every row is sampled, so every row is finished
    (again,) = llm.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
    assert again.token_ids == out.token_ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_finishes_only_sampled_rows_and_still_matches_hugging_face(
        family: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    hf_model = make_tiny_model(tmp_path, family, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="fp32")
    layer = llm.engine.runner.model.model.layers[-1]
    rows: list[int] = []
    forward = layer.forward

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = forward(*args, **kwargs)
        rows.append((out[0] if isinstance(out, tuple) else out).shape[0])
        return out

    layer.forward = counted
    prompts = [list(range(5, 14)), list(range(20, 25))]
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert rows == [2, 2, 2]  # the prompts' step, then two decode steps: one row per sequence each
    assert [o.token_ids for o in outputs] == [hf_greedy(hf_model, p, 3) for p in prompts]


def test_the_memory_profile_runs_every_row_through_the_last_layer(model_path: Path) -> None:
    """The CUDA profiling step sizes activations for the largest step, one with prompt logprobs,
    so it must not finish only its sampled row (one sequence, one logit row: it could)."""
    from lmserve.engine.memory_profile import profiling_step

    llm = LLM(str(model_path), dtype="fp32", max_num_seqs=1)
    runner = llm.engine.runner
    first, last = _mlp_rows(llm)
    step = profiling_step(32, 64, runner.block_size, 1)
    runner._forward(step, runner.kv_caches, every_row=True)
    assert first == last == [32]
    first.clear(), last.clear()
    runner._forward(step, runner.kv_caches)
    assert first == [32] and last == [1]
