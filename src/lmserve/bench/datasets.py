"""Workloads for ``lmserve bench``: random lengths, a JSONL file of prompts, shared prefixes.

Prompts are text, so every dialect can send them. Without a tokenizer a prompt of N "tokens" is N
common English words (about one token each in the usual BPE vocabularies; the server's ``usage``
reports the true count). With ``--tokenizer`` (a ``tokenizer.json`` or a directory holding one) the
length is exact in that tokenizer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from lmserve.bench import BenchUsageError
from lmserve.bench.dialects import Prompt

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "by", "hot", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would", "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more", "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water", "than", "call", "first", "who", "may", "down", "side", "been", "now", "find", "any", "new", "work", "part", "take", "get", "place", "made", "live", "where", "after", "back", "little", "only", "round", "man", "year", "came", "show", "every", "good", "me", "give", "our", "under", "name", "very", "through", "just", "form", "sentence", "great"]


def parse_range(flag: str, text: str) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"64:256"`` -> (64, 256), both bounds included."""
    low, _, high = str(text).partition(":")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise BenchUsageError(f"{flag}: {text!r} is not N or MIN:MAX (token counts)") from None
    if not 1 <= lo <= hi:
        raise BenchUsageError(f"{flag}: {text!r} needs 1 <= MIN <= MAX")
    return lo, hi


class TextMaker:
    """Random text of a given length, in words or, with a tokenizer, in exact tokens."""

    def __init__(self, rng: random.Random, tokenizer: str | None = None) -> None:
        self.rng = rng
        self._encode: Callable[[str], list[int]] | None = None
        self._decode: Callable[[list[int]], str] | None = None
        if tokenizer:
            from tokenizers import Tokenizer

            path = Path(tokenizer)
            tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            self._decode = tok.decode

    def make(self, length: int) -> tuple[str, int | None]:
        words = " ".join(self.rng.choice(WORDS) for _ in range(length))
        if self._encode is None or self._decode is None:
            return words, None
        ids = self._encode(words)
        while len(ids) < length:  # a tokenizer that merges words: add more
            ids += self._encode(" " + self.rng.choice(WORDS))
        return self._decode(ids[:length]), length


def random_prompts(n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int,
                   tokenizer: str | None = None) -> list[Prompt]:
    rng = random.Random(seed)
    maker = TextMaker(rng, tokenizer)
    prompts = []
    for _ in range(n):
        text, count = maker.make(rng.randint(*input_len))
        prompts.append(Prompt(text, rng.randint(*output_len), count))
    return prompts


def shared_prefix_prompts(n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int,
                          prefix_len: int, num_prefixes: int, tokenizer: str | None = None) -> list[Prompt]:
    """Each prompt is one of ``num_prefixes`` shared prefixes plus its own random suffix: a server
    with prefix caching computes each prefix once."""
    rng = random.Random(seed)
    maker = TextMaker(rng, tokenizer)
    prefixes = [maker.make(prefix_len) for _ in range(num_prefixes)]
    prompts = []
    for i in range(n):
        prefix, prefix_count = prefixes[i % num_prefixes]
        suffix, suffix_count = maker.make(rng.randint(*input_len))
        count = prefix_count + suffix_count if prefix_count is not None and suffix_count is not None else None
        prompts.append(Prompt(f"{prefix} {suffix}", rng.randint(*output_len), count))
    return prompts


def file_prompts(path: Path, n: int | None, output_len: tuple[int, int], seed: int) -> list[Prompt]:
    """A JSONL file, one ``{"prompt": str, "output_len"?: int}`` per line (``max_tokens`` is accepted
    for ``output_len``); lines are used in order and repeated to reach ``n``."""
    rng = random.Random(seed)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BenchUsageError(f"--dataset {path}: line {number} is not {{\"prompt\": ...}} JSON") from None
        out = row.get("output_len", row.get("max_tokens"))
        rows.append(Prompt(str(text), int(out) if out else rng.randint(*output_len)))
    if not rows:
        raise BenchUsageError(f"--dataset {path}: the file holds no prompt")
    return [rows[i % len(rows)] for i in range(n or len(rows))]
