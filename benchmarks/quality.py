"""Quality of quantized weights: perplexity of a fixed text, and greedy agreement with bf16.

The text ships with Python itself: the docstrings of the modules in ``MODULES`` and of their public
members (sorted by name), concatenated in that order, so every machine with the same Python version
scores the same text (the version is printed with the results). Perplexity is over non-overlapping
windows of ``--window`` tokens (the first ``--max-tokens`` tokens of the text). Greedy agreement runs
``--prompts`` prompts (consecutive ``--prompt-len``-token slices of the text) for ``--new-tokens``
tokens in each mode and in bf16: the share of generated tokens that lie in the common prefix with
bf16's continuation, and how many continuations are identical throughout.

    python benchmarks/quality.py [--model PATH_OR_GGUF] [--modes none,int8,int4,gguf]

Not a timing benchmark. Targets (issue 16): int8 within 1% of bf16 perplexity, 4-bit within 8%.
``gguf`` needs a GGUF model (the default model is one: SmolLM2-135M-Instruct Q4_1, whose bf16
weights are themselves the Q4_1 values, so for it every mode starts from 4-bit weights).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import time
from pathlib import Path

import torch

MODULES = ("json", "argparse", "collections", "functools", "itertools", "pathlib", "textwrap", "string",
           "statistics", "fractions", "heapq", "bisect", "shutil", "tempfile", "csv")


def reference_text() -> str:
    """The module and public-member docstrings of ``MODULES``, in a fixed order."""
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr))
            if doc and getattr(getattr(module, attr), "__module__", name) == name:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def perplexity(model_dir: Path, mode: str, ids: list[int], window: int) -> tuple[float, float, float]:
    """(perplexity, weight MiB, seconds) of ``ids`` under the model loaded with ``quantize=mode``."""
    from lmserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache
    from lmserve.kernels import get_ops
    from lmserve.kernels.device import resolve_dtype
    from lmserve.models.layers import ForwardContext
    from lmserve.models.loader import load_model
    from lmserve.models.quantize import weight_bytes

    device = torch.device("cpu")
    dtype = resolve_dtype("bf16", device)
    ops = get_ops(device)
    start = time.perf_counter()
    model, cfg = load_model(model_dir, dtype, device, ops, quantize=mode)
    mib = weight_bytes(model)[0] / 2**20
    block = 16
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block, dtype)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for lo in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[lo:lo + window + 1])
            n = len(chunk) - 1
            if n < 2:
                break
            blocks = -(-n // block)
            ctx = ForwardContext(slot_mapping=torch.arange(n), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                                 context_lens=torch.tensor([n], dtype=torch.int32),
                                 query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                                 kv_caches=allocate_kv_cache(spec, blocks, device), ops=ops)
            hidden = model(chunk[:-1], torch.arange(n), ctx)
            logits = model.compute_logits(hidden).float()
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
            count += n
    return math.exp(nll / count), mib, time.perf_counter() - start


def greedy(model_dir: Path, mode: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from lmserve import LLM, SamplingParams

    llm = LLM(model_dir, quantize=mode, dtype="bf16", max_num_seqs=len(prompts))
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    return [list(o.token_ids) for o in outputs]


def agreement(base: list[list[int]], other: list[list[int]]) -> tuple[float, int]:
    """(share of tokens in the common prefix with ``base``, continuations identical throughout)."""
    prefix = 0
    for a, b in zip(base, other, strict=True):
        prefix += next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    total = sum(len(a) for a in base)
    return prefix / total, sum(a == b for a, b in zip(base, other, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or .gguf file (default: the default model)")
    parser.add_argument("--modes", default="none,int8,int4,gguf")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens of the text scored")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    from lmserve.engine.llm import resolve_model_dir
    from lmserve.engine.tokenizer import Tokenizer

    model_dir = resolve_model_dir(args.model)
    text = reference_text()
    ids = Tokenizer(model_dir).encode(text)[:args.max_tokens]
    step = max(args.prompt_len, len(ids) // max(args.prompts, 1))
    prompts = [ids[i:i + args.prompt_len] for i in range(0, step * args.prompts, step)][:args.prompts]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    modes = ["none", *(m for m in modes if m != "none")]  # bf16 first: the "vs bf16" column divides by it
    print(f"model {model_dir.name}; text: docstrings of {', '.join(MODULES)} (Python "
          f"{sys.version.split()[0]}), {len(text)} characters, {len(ids)} tokens scored in windows of {args.window}")
    base = greedy(model_dir, "none", prompts, args.new_tokens) if args.prompts else []
    results = {}
    print("| quantize | weights MiB | perplexity | vs bf16 | greedy tokens agreeing | identical continuations |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in modes:
        ppl, mib, _ = perplexity(model_dir, mode, ids, args.window)
        results[mode] = ppl
        share, same = agreement(base, greedy(model_dir, mode, prompts, args.new_tokens)) if args.prompts else (1.0, 0)
        rel = ppl / results["none"] - 1
        label = "none (bf16)" if mode == "none" else mode
        print(f"| {label} | {mib:.1f} | {ppl:.3f} | {rel:+.2%} | {share:.1%} | {same}/{len(prompts)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
