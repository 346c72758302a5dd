"""Engine behaviour a user sees: stopping, aborting, limits, prefix caching, chat."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve import LLM, SamplingParams
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.step_budget import OFFLINE_TARGET_STEP_S, TARGET_STEP_S
from lmserve.errors import InvalidRequestError
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> LLM:
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model(path, "llama", tokenizer_dir)
    return LLM(str(path), dtype="fp32", max_model_len=128, block_size=4)


def test_max_new_tokens_ends_with_length(llm: LLM) -> None:
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    (free,) = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_at], ignore_eos=True))
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_string_truncates_text(llm: LLM) -> None:
    (free,) = llm.generate(["hello"], SamplingParams(max_new_tokens=20, ignore_eos=True, skip_special_tokens=False))
    needle = free.text[4:7]
    (out,) = llm.generate(["hello"], SamplingParams(max_new_tokens=20, ignore_eos=True, stop=[needle],
                                                    skip_special_tokens=False))
    assert out.finish_reason == "stop" and out.stop_reason == needle
    assert out.text == free.text[:free.text.index(needle)]


def test_generation_stops_at_the_context_limit(llm: LLM) -> None:
    (out,) = llm.generate([list(range(3, 123))], SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, field", [([], "inputs"), (list(range(3, 131)), "inputs"), ([99999], "inputs")])
def test_bad_prompts_are_refused_with_the_field(llm: LLM, prompt: list[int], field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        llm.generate([prompt])
    assert err.value.field == field
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks_and_reports_abort(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("x", [5, 6, 7, 8, 9], SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_free < engine.stats().kv_blocks_total
    engine.abort_request("x")
    deltas = engine.step()
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("x", "abort")]
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
    assert not engine.has_unfinished_requests()


def test_shared_prefix_is_served_from_cache(llm: LLM) -> None:
    prefix = list(range(10, 42))
    before = llm.engine.stats().prefix_cache_hit_tokens_total
    first = llm.generate([prefix + [50]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    second = llm.generate([prefix + [50]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert llm.engine.stats().prefix_cache_hit_tokens_total - before >= 28
    assert second[0].num_cached_tokens >= 28 and first[0].token_ids == second[0].token_ids


def test_logprobs_come_with_each_token(llm: LLM) -> None:
    (out,) = llm.generate([[5, 6]], SamplingParams(max_new_tokens=3, logprobs=2, ignore_eos=True))
    assert out.logprobs is not None and [lp.token_id for lp in out.logprobs] == out.token_ids
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in out.logprobs)


def test_chat_applies_the_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "hi"}]
    (via_chat,) = llm.chat(messages, SamplingParams(max_new_tokens=3, ignore_eos=True))
    ids = llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert via_chat.prompt_token_ids == ids
    (via_ids,) = llm.generate([ids], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert via_chat.token_ids == via_ids.token_ids


def test_seeded_sampling_is_reproducible_across_batches(llm: LLM) -> None:
    p = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    (alone,) = llm.generate([[5, 6, 7]], p)
    crowd = llm.generate([[9, 9], [5, 6, 7], [4]], [SamplingParams(max_new_tokens=8, temperature=1.0), p,
                                                    SamplingParams(max_new_tokens=3)])
    assert crowd[1].token_ids == alone.token_ids


def test_streaming_deltas_add_up(llm: LLM) -> None:
    import asyncio

    async def collect() -> list:
        return [d async for d in llm.stream([5, 6, 7], SamplingParams(max_new_tokens=6, ignore_eos=True))]

    deltas = asyncio.run(collect())
    (whole,) = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text and deltas[-1].finish_reason == "length"


def test_kv_cache_is_sized_in_tokens_or_bytes(tmp_path: Path, tokenizer_dir: Path) -> None:
    make_tiny_model(tmp_path, "llama", tokenizer_dir)
    by_tokens = LLM(str(tmp_path), dtype="fp32", kv_cache_tokens=256, block_size=16)
    assert by_tokens.engine.model_info.kv_cache_tokens == 256
    per_token = by_tokens.engine.runner.kv_spec.bytes_per_token  # 2 layers x K,V x 2 heads x 16 x 4 bytes
    assert per_token == 2 * 2 * 2 * 16 * 4
    by_bytes = LLM(str(tmp_path), dtype="fp32", kv_cache_bytes=per_token * 512, block_size=16)
    assert by_bytes.engine.model_info.kv_cache_tokens == 512


def test_prompt_logprobs_score_each_prompt_token_as_generation_would(llm: LLM) -> None:
    prompt = [5, 6, 7]
    (free,) = llm.generate([prompt], SamplingParams(max_new_tokens=3, logprobs=0, ignore_eos=True))
    scored_prompt = prompt + free.token_ids
    neighbour = [9, 10, 11, 12]
    alone = llm.generate([neighbour], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].token_ids
    for _ in range(2):  # the second time the prompt is in the prefix cache, which must not skip scoring
        scored, other = llm.generate([scored_prompt, neighbour], [
            SamplingParams(max_new_tokens=1, prompt_logprobs=2, ignore_eos=True),
            SamplingParams(max_new_tokens=3, ignore_eos=True)])  # fmt: skip
        lps = scored.prompt_logprobs
        assert lps is not None and [lp.token_id for lp in lps] == scored_prompt[1:]
        assert [lp.logprob for lp in lps[2:]] == pytest.approx([lp.logprob for lp in free.logprobs or []], abs=1e-4)
        assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.logprob for lp in lps)
        assert other.token_ids == alone and other.prompt_logprobs is None


def test_offline_generation_aims_at_longer_steps_than_serving(llm: LLM) -> None:
    """Nobody waits between the steps of ``LLM.generate``: it aims at the longer offline step; an
    engine built for serving (the default) aims at the shorter one every running stream waits through."""
    assert llm.engine.scheduler.budget.target_step_s == OFFLINE_TARGET_STEP_S > TARGET_STEP_S
    served = LLMEngine(llm.config, runner=llm.engine.runner)
    assert served.scheduler.budget.target_step_s == TARGET_STEP_S


def test_idle_warming_maps_only_never_used_blocks_ahead_of_use(tmp_path: Path, tokenizer_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import lmserve.engine.llm_engine as le

    make_tiny_model(tmp_path, "llama", tokenizer_dir)
    engine = LLM(str(tmp_path), dtype="fp32", kv_cache_tokens=512, block_size=4).engine
    assert engine.block_manager.mapped == 0  # the CPU maps the cache's memory on first write
    engine.add_request("r", list(range(5, 30)), SamplingParams(max_new_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    used = engine.block_manager.high_water  # blocks 0 .. used-1 have held keys
    assert used >= 7
    for k, v in engine.runner.kv_caches:
        k.fill_(7.0)
        v.fill_(7.0)
    tensors = 2 * len(engine.runner.kv_caches)
    assert engine.runner.num_kv_tensors == tensors
    per_block = 4 * engine.runner.kv_spec.bytes_per_token // tensors  # of one layer's keys or values
    monkeypatch.setattr(le, "WARM_AHEAD_TOKENS", 40)  # ten blocks ahead ...
    monkeypatch.setattr(le, "WARM_SLICE_BYTES", 3 * per_block)  # ... three of one tensor per call
    assert engine.warm_idle()
    first_keys = engine.runner.kv_caches[0][0]
    assert (first_keys[used:used + 3] == 0.0).all() and (first_keys[used + 3:] == 7.0).all()
    assert all((t == 7.0).all() for t in [engine.runner.kv_caches[0][1], *engine.runner.kv_caches[-1]])
    calls = 2
    while engine.warm_idle():
        calls += 1
    # 3 + 3 + 3 + 1 blocks of each tensor, one tensor a call, then nothing is left
    assert calls == 4 * tensors and not engine.warm_idle()
    assert engine.block_manager.mapped == used + 10  # what the block manager now hands out first
    for k, v in engine.runner.kv_caches:
        for cache in (k, v):
            assert (cache[:used] == 7.0).all()  # what requests wrote is untouched
            assert (cache[used:used + 10] == 0.0).all()  # the next ten blocks were written (mapped)
            assert (cache[used + 10:] == 7.0).all()  # nothing beyond


def test_idle_warming_starts_over_above_blocks_taken_between_its_calls(tmp_path: Path, tokenizer_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import lmserve.engine.llm_engine as le

    make_tiny_model(tmp_path, "llama", tokenizer_dir)
    engine = LLM(str(tmp_path), dtype="fp32", kv_cache_tokens=512, block_size=4).engine
    per_block = 4 * engine.runner.kv_spec.bytes_per_token // engine.runner.num_kv_tensors
    monkeypatch.setattr(le, "WARM_AHEAD_TOKENS", 40)
    monkeypatch.setattr(le, "WARM_SLICE_BYTES", 8 * per_block)
    assert engine.warm_idle() and engine.warm_idle()  # blocks 0-7 of the first two tensors mapped
    engine.add_request("r", list(range(5, 30)), SamplingParams(max_new_tokens=2))  # takes blocks 0-6
    while engine.has_unfinished_requests():
        engine.step()
    used = engine.block_manager.high_water
    assert 2 <= used < 8
    for k, v in engine.runner.kv_caches:
        k[:used] = 5.0  # stands for the keys the request wrote
        v[:used] = 5.0
    while engine.warm_idle():
        pass
    for k, v in engine.runner.kv_caches:
        for cache in (k, v):
            assert (cache[:used] == 5.0).all()  # never written over once held
            assert (cache[used:used + 10] == 0.0).all()
