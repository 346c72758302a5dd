"""Workloads: random lengths (exact with a tokenizer), shared prefixes, a JSONL file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lmserve.bench import BenchUsageError
from lmserve.bench.bench import PromptStream, build_prompts
from lmserve.bench.datasets import file_prompts, parse_range, random_prompts, shared_prefix_prompts


def test_random_lengths_are_exact_with_a_tokenizer(tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    prompts = random_prompts(20, (5, 40), (3, 9), seed=1, tokenizer=str(tokenizer_dir))
    for p in prompts:
        assert 5 <= p.prompt_tokens <= 40 and 3 <= p.output_len <= 9
        # decoding then encoding again may merge at most a little differently; it is the length sent
        assert abs(len(tok.encode(p.text, add_special_tokens=False).ids) - p.prompt_tokens) <= 2
    assert random_prompts(20, (5, 40), (3, 9), seed=1, tokenizer=str(tokenizer_dir)) == prompts  # seeded


def test_random_lengths_in_words_without_a_tokenizer() -> None:
    p = random_prompts(1, (12, 12), (4, 4), seed=0)[0]
    assert len(p.text.split()) == 12 and p.prompt_tokens is None and p.output_len == 4


def test_shared_prefixes_repeat() -> None:
    prompts = shared_prefix_prompts(6, (3, 3), (2, 2), seed=0, prefix_len=10, num_prefixes=2)
    prefixes = [" ".join(p.text.split()[:10]) for p in prompts]
    assert prefixes[0] == prefixes[2] == prefixes[4] != prefixes[1] == prefixes[3]
    assert len({p.text for p in prompts}) == 6  # each has its own suffix


def test_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 7}\n\n{"prompt": "bye", "max_tokens": 2}\n')
    prompts = file_prompts(path, 3, (5, 5), seed=0)
    assert [(p.text, p.output_len) for p in prompts] == [("hello there", 7), ("bye", 2), ("hello there", 7)]
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(BenchUsageError, match="line 2"):
        file_prompts(path, None, (5, 5), seed=0)


@pytest.mark.parametrize("text", ["0", "9:3", "x", "1:y"])
def test_bad_ranges(text: str) -> None:
    with pytest.raises(BenchUsageError, match="--input-len"):
        parse_range("--input-len", text)


def workload_args(dataset: str, **more: object) -> argparse.Namespace:
    return argparse.Namespace(dataset=dataset, input_len="4:12", output_len="3", seed=5, tokenizer=None,
                              prefix_len=6, num_prefixes=2, **more)


def test_a_prompt_stream_never_gives_a_prompt_twice() -> None:
    """A sweep measures every load level against one server: each level must send new prompts, or
    the server's prefix cache would spare it their prefill."""
    stream = PromptStream(workload_args("random"))
    parts = [stream.take(2), stream.take(5), stream.take(3)]
    texts = [p.text for part in parts for p in part]
    assert len(set(texts)) == 10
    assert texts == [p.text for p in build_prompts(workload_args("random"), 10)]  # the same seeded sequence


def test_a_prompt_stream_over_a_file_runs_on_through_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "line {i}"}}\n' for i in range(1, 5)))
    stream = PromptStream(workload_args(str(path)))
    assert [p.text for p in stream.take(2)] == ["line 1", "line 2"]
    assert [p.text for p in stream.take(3)] == ["line 3", "line 4", "line 1"]  # wraps once the file runs out
