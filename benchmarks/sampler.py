"""Sampler: milliseconds per decode step to choose the next tokens, against a plain reference.

The reference is the straightforward implementation: per row, ``torch.multinomial`` over the whole
softmax, and a full ``torch.sort`` of the vocabulary for top-p. The engine's ``Sampler`` searches
cumulative sums for all unfiltered rows at once and finds top-p candidates among the tokens at least
1/1024 as likely as the most likely one (sorting only those, or the probabilities alone). Both run
here on the same logits, in turns, single-threaded as a decode step's sampling is:

- ``flat``: Gaussian logits (the top-p set holds thousands of tokens, the harder case);
- ``peaked``: probability falling as rank^-2, closer to what a language model gives (a few hundred
  tokens hold 0.9 of it).

    python benchmarks/sampler.py [--rows 8] [--vocab 49152] [--repeats 30]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lmserve.engine.request import Request
from lmserve.engine.sampler import Sampler
from lmserve.engine.sampling_params import SamplingParams

SETTINGS = {"greedy": {}, "temperature 1": {"temperature": 1.0}, "top_p 0.9": {"temperature": 1.0, "top_p": 0.9},
            "top_k 50": {"temperature": 1.0, "top_k": 50}}  # fmt: skip


def reference(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """Per row: argmax, or multinomial over the softmax after top-k (``topk``) or top-p (full sort)."""
    tokens = []
    for row, req in zip(logits, requests, strict=True):
        p = req.params
        if p.greedy:
            tokens.append(int(row.argmax()))
            continue
        scaled = row / p.temperature
        if 0 < p.top_k < len(row):
            values, indices = scaled.topk(p.top_k)
        elif p.top_p < 1.0:
            values, indices = scaled.sort(descending=True)
        else:
            tokens.append(int(torch.multinomial(torch.softmax(scaled, -1), 1)))
            continue
        probs = torch.softmax(values, -1)
        if p.top_p < 1.0:
            probs = probs * ((probs.cumsum(-1) - probs) < p.top_p)
        tokens.append(int(indices[torch.multinomial(probs, 1)]))
    return tokens


def logits_of(kind: str, rows: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if kind == "flat":
        return torch.randn(rows, vocab, generator=generator) * 3
    ranks = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(rows)]).float() + 1
    return -2.0 * ranks.log()  # probability ~ rank^-2 at temperature 1


def time_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="sequences in the decode step")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (the default model's)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}; {args.rows} rows x {args.vocab} logits, one thread, "
          f"median of {args.repeats}")  # fmt: skip
    print("| logits | setting | reference ms | Sampler ms | speed-up |\n|---|---|---:|---:|---:|")
    for kind in ("flat", "peaked"):
        logits = logits_of(kind, args.rows, args.vocab)
        for name, params in SETTINGS.items():
            requests = [Request(f"r{i}", [1, 2, 3], SamplingParams(**params)) for i in range(args.rows)]
            sampler = Sampler()
            ours = time_ms(lambda: sampler(logits.clone(), requests), args.repeats)  # noqa: B023
            theirs = time_ms(lambda: reference(logits.clone(), requests), args.repeats)  # noqa: B023
            print(f"| {kind} | {name} | {theirs:.2f} | {ours:.2f} | {theirs / ours:.1f}x |")


if __name__ == "__main__":
    main()
