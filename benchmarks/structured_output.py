"""Structured-output overhead: the offline workload with half its requests constrained to a JSON
schema, against the same workload unconstrained, in one process on one loaded model.

Workload (default): the default model, 64 requests, prompts of 64-512 random tokens, 128 new tokens
each. Unconstrained requests ignore end-of-sequence; constrained ones follow a schema (an array of
exactly 100 integers) whose shortest instance is longer than 128 tokens, so every request of both
runs makes exactly 128 tokens and the two runs do the same model work. Runs alternate
(unconstrained, constrained, ...) ``--repeats`` times; the table shows each run and the ratio of the
medians (target: constrained at least 0.85 of unconstrained). The prefix cache is off, so every run
prefills its prompts as the first would. Mask time is the sampler's time in the structured-output
masks.

    python benchmarks/structured_output.py [--num-requests 64] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from lmserve import LLM, SamplingParams
from lmserve.dtypes import DTYPES
from lmserve.engine.structured_spec import StructuredOutputs

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["values"],
          "properties": {"values": {"type": "array", "minItems": 100, "maxItems": 100,
                                    "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(100, vocab, (length,), generator=gen).tolist() for length in lengths]  # skip specials


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], mask_time: list[float]) -> tuple[int, float, float]:
    mask_time[0] = 0.0
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return sum(len(o.token_ids) for o in outputs), time.perf_counter() - start, mask_time[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the default model)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # No prefix cache: every run repeats the same prompts, and the offline workload prefills them each time.
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, enable_prefix_caching=False)
    mask_time = [0.0]
    masks = llm.engine.structured.apply_masks

    def timed_masks(logits, requests):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        t = time.perf_counter()
        masks(logits, requests)
        mask_time[0] += time.perf_counter() - t

    llm.engine.sampler._mask = timed_masks
    prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, llm.engine.model_info.vocab_size,
                           args.seed)
    plain = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    constrained = SamplingParams(max_new_tokens=args.new_tokens, structured=StructuredOutputs(json=json.dumps(SCHEMA)))
    workloads = {"unconstrained": [plain] * len(prompts),
                 "half JSON-schema": [constrained if i % 2 else plain for i in range(len(prompts))]}
    llm.generate(prompts[:2], [plain, constrained])  # warm-up, and the schema's compilation
    print(f"workload: {len(prompts)} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.new_tokens} new tokens, {args.dtype}, max_num_seqs {args.max_num_seqs}", flush=True)
    results: dict[str, list[tuple[int, float, float]]] = {name: [] for name in workloads}
    for _ in range(args.repeats):
        for name, params in workloads.items():
            results[name].append(r := run(llm, prompts, params, mask_time))
            print(f"  {name}: {r[0]} tokens in {r[1]:.1f}s = {r[0] / r[1]:.1f} tok/s (masks {r[2]:.2f}s)", flush=True)
    print("\n| workload | output tokens | seconds (median) | output tok/s | mask time (s) |")
    print("|---|---:|---:|---:|---:|")
    tps = {}
    for name, runs in results.items():
        seconds = statistics.median(r[1] for r in runs)
        tps[name] = runs[0][0] / seconds
        print(f"| {name} | {runs[0][0]} | {seconds:.1f} | {tps[name]:.1f} | {statistics.median(r[2] for r in runs):.2f} |")
    ratio = tps["half JSON-schema"] / tps["unconstrained"]
    print(f"\nconstrained / unconstrained output tok/s: {ratio:.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
