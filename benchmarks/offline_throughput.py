"""Offline throughput: lmserve against Hugging Face static and continuous batching and OpenVINO GenAI.

Workload (``--model-shape default``): the default model, 64 requests, prompts of 64-512 random tokens,
128 new tokens each with end-of-sequence ignored. ``--model-shape tinyllama-1.1b``: a random-weight
bf16 Llama of TinyLlama-1.1B's shape (written once into the lmserve cache), 16 requests, prompts of
128-384 tokens, 64 new. Prints output tokens/s per system and the ratios, then single-stream decode
speed (one request, the same new tokens). lmserve and Hugging Face run in this process, one after
another, so they share the machine's state; rerun to see the noise. Every system first warms up on
the same two prompts, which share no prefix with the workload (``warmup_prompts``).

The last column divides each system's time by the workload's floor on this machine (its arithmetic
at the fastest linear kernel here, or its prompts' arithmetic followed by the decode passes of the
last request to start, each reading every weight at the measured memory bandwidth, whichever is
longer; ``peers/roofline.py``): the highest ratio over that system any implementation of the same
arithmetic could reach here.

``ov-genai`` (optional) is OpenVINO GenAI's continuous batching pipeline, in a child process of its
own virtual environment: the same checkpoint exported to OpenVINO IR with fp16 weights and no
compression, bf16 compute and bf16 KV cache, the same token ids, greedy, exactly as many new tokens.
Set it up once (idempotent; it borrows torch from the Python given for the export step)::

    PYTHON=.venv/bin/python benchmarks/peers/setup_openvino.sh

    python benchmarks/offline_throughput.py [--model-shape default|tinyllama-1.1b]
        [--systems lmserve,hf-static,hf-batch,ov-genai] [--dtype bf16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peers.cpuinfo import describe_cpu
from peers.model_shapes import MODEL_SHAPES, model_dir_for
from peers.ov_genai import ov_python, run_ov_genai
from peers.roofline import floor_for
from peers.rounds import round_order

from lmserve.dtypes import DTYPES, torch_dtype


def make_workload(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    # Skip the first ids: tokenizers keep special tokens there.
    return [torch.randint(100, vocab, (length,), generator=gen).tolist() for length in lengths]


def round_prompts(prompts: list[list[int]], vocab: int, seed: int, round_index: int) -> list[list[int]]:
    """The workload of round ``round_index``: round 0 is ``prompts``; later rounds keep every prompt's
    length (so the floor and the work stay the same) and draw fresh token ids, so that no system finds
    an earlier round's prompts in a cache."""
    if round_index == 0:
        return prompts
    gen = torch.Generator().manual_seed(seed * 1000 + round_index)
    return [torch.randint(100, vocab, (len(p),), generator=gen).tolist() for p in prompts]


def warmup_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """Two warm-up prompts that share no prefix with the workload: its first two, reversed. Warming
    up on the workload's own prompts would leave their blocks in lmserve's prefix cache, and the
    timed run would skip computing them while every other system computes them (the 16-request
    TinyLlama run once skipped 576 of its 4,003 prompt tokens that way)."""
    return [p[::-1] for p in prompts[:2]]


def run_lmserve(model_dir: str, prompts: list[list[int]], new_tokens: int, args: argparse.Namespace) -> tuple[int, float]:
    from lmserve import SamplingParams

    llm = _lmserve(model_dir, args, fresh=True)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate(warmup_prompts(prompts), SamplingParams(max_new_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    GENERATED["lmserve"] = [list(o.token_ids) for o in outputs]
    return sum(len(o.token_ids) for o in outputs), elapsed


# Each system's generated ids, in prompt order, where it gives them: greedy agreement with lmserve
# says every system computed the same model (a broken export or conversion shows up here).
GENERATED: dict[str, list[list[int]]] = {}


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Mean fraction of each reference sequence that ``other`` reproduces before the first difference."""
    fractions = []
    for ref, seq in zip(reference, other, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref, seq, strict=False)) if a != b), min(len(ref), len(seq)))
        fractions.append(same / len(ref) if ref else 1.0)
    return sum(fractions) / len(fractions) if fractions else float("nan")


_LLM_CACHE: dict[str, object] = {}


def _lmserve(model_dir: str, args: argparse.Namespace, fresh: bool = False):  # noqa: ANN202
    """The engine of the last throughput round (the single-stream run reuses it); ``fresh`` builds a
    new one, as every other system starts each round anew (no KV memory mapped by an earlier round)."""
    from lmserve import LLM

    if fresh or "llm" not in _LLM_CACHE:
        if _LLM_CACHE.pop("llm", None) is not None:
            gc.collect()  # the earlier engine's weights and cache go before the next one loads
        _LLM_CACHE["llm"] = LLM(model_dir, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=args.max_batched_tokens)
    return _LLM_CACHE["llm"]


def _hf_model(model_dir: str, dtype: str):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).eval()


def _hf_static_batch(model, chunk: list[list[int]], new_tokens: int) -> list[list[int]]:  # noqa: ANN001
    """``generate`` on one left-padded batch; the new tokens of each prompt."""
    pad, width = 0, max(len(p) for p in chunk)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return out[:, width:].tolist()


def run_hf_static(model_dir: str, prompts: list[list[int]], new_tokens: int, args: argparse.Namespace) -> tuple[int, float]:
    model = _hf_model(model_dir, args.dtype)
    _hf_static_batch(model, warmup_prompts(prompts), 2)
    generated = []
    start = time.perf_counter()
    for i in range(0, len(prompts), args.hf_batch):
        generated += _hf_static_batch(model, prompts[i:i + args.hf_batch], new_tokens)
    elapsed = time.perf_counter() - start
    produced = sum(map(len, generated))
    GENERATED["hf-static"] = generated
    return produced, elapsed


def run_hf_batch(model_dir: str, prompts: list[list[int]], new_tokens: int, args: argparse.Namespace) -> tuple[int, float]:
    from transformers import GenerationConfig

    model = _hf_model(model_dir, args.dtype)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate_batch(inputs=warmup_prompts(prompts), generation_config=GenerationConfig(
            max_new_tokens=2, min_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0))
        start = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=config)
    elapsed = time.perf_counter() - start
    return sum(len(r.generated_tokens) for r in results.values()), elapsed


def run_ov(model_dir: str, prompts: list[list[int]], new_tokens: int, args: argparse.Namespace) -> tuple[int, float]:
    tokens, seconds, GENERATED["ov-genai"] = run_ov_genai(
        Path(model_dir), prompts, new_tokens, python=ov_python(args.ov_python), max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.ov_batched_tokens, cache_gb=args.ov_cache_gb, threads=torch.get_num_threads(),
        warmup=warmup_prompts(prompts))
    return tokens, seconds


Runner = Callable[[str, list[list[int]], int, argparse.Namespace], tuple[int, float]]
SYSTEMS: dict[str, Runner] = {
    "lmserve": run_lmserve,
    "hf-static": run_hf_static,
    "hf-batch": run_hf_batch,
    "ov-genai": run_ov,
}


def single_stream_prompt(vocab: int) -> list[int]:
    """The 16-token prompt of the single-stream run, drawn from the model's own vocabulary."""
    return make_workload(vocab, 1, 16, 16, seed=1)[0]


def single_stream(model_dir: str, vocab: int, args: argparse.Namespace) -> list[tuple[str, float]]:
    """Decode speed of one request: new tokens / time after the first token."""
    from lmserve import SamplingParams

    rows = []
    prompt = single_stream_prompt(vocab)
    llm = _lmserve(model_dir, args)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        first = None
        llm.engine.add_request("single", prompt, SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
        n = 0
        while llm.engine.has_unfinished_requests():
            for d in llm.engine.step():
                n += len(d.token_ids)
                if first is None and d.token_ids:
                    first = time.perf_counter()
        times.append((n - 1) / (time.perf_counter() - first))
    rows.append(("lmserve", sorted(times)[1]))
    if "hf-static" in args.systems:
        model = _hf_model(model_dir, args.dtype)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=0)
        rows.append(("hf generate (batch 1)", args.new_tokens / (time.perf_counter() - t0)))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the workload's unset sizes taken from ``--model-shape``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the one --model-shape names)")
    parser.add_argument("--model-shape", default="default", choices=sorted(MODEL_SHAPES),
                        help="default: the default model; tinyllama-1.1b: random bf16 weights of that shape")
    parser.add_argument("--systems", default="lmserve,hf-static,hf-batch",
                        help=f"comma-separated, from {','.join(SYSTEMS)}")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--min-prompt", type=int, default=None)
    parser.add_argument("--max-prompt", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--hf-batch", type=int, default=None, help="HF static batch (default: min(32, requests))")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=None)
    parser.add_argument("--ov-python", default=None, help="the OpenVINO environment's python "
                        "(default: bench_results/ov-venv/bin/python)")
    parser.add_argument("--ov-batched-tokens", type=int, default=256,
                        help="OpenVINO GenAI's step token budget (its own default: 256)")
    parser.add_argument("--ov-cache-gb", type=int, default=4, help="OpenVINO GenAI's KV cache size")
    parser.add_argument("--no-single-stream", action="store_true")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor (benchmarks/peers/roofline.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every system this many times, in alternating order, on fresh prompts of the "
                             "same lengths each round, and report each one's median (a host whose speed drifts "
                             "within a run otherwise favours whichever system ran in its faster minutes)")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.rounds < 1:
        parser.error(f"--rounds: {args.rounds} is not a positive number of rounds")
    _, workload = MODEL_SHAPES[args.model_shape]
    for field in ("num_requests", "min_prompt", "max_prompt", "new_tokens"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(workload, field))
    if args.hf_batch is None:
        args.hf_batch = min(32, args.num_requests)
    return args


def main() -> None:
    args = parse_args()
    if args.model is None:
        args.model = str(model_dir_for(args.model_shape))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    prompts = make_workload(vocab, args.num_requests, args.min_prompt, args.max_prompt, args.seed)
    print(f"cpu: {describe_cpu()}")
    print(f"workload: {args.model_shape} model, {len(prompts)} requests, prompts {args.min_prompt}-"
          f"{args.max_prompt} tokens ({sum(map(len, prompts))} in all), {args.new_tokens} new tokens each, "
          f"{args.dtype}, {torch.get_num_threads()} threads")
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in args.systems}
    for r in range(args.rounds):
        workload = round_prompts(prompts, vocab, args.seed, r)
        for name in round_order(args.systems, r):
            tokens, seconds = SYSTEMS[name](args.model, workload, args.new_tokens, args)
            runs[name].append((tokens, seconds))
            where = f" (round {r + 1}/{args.rounds})" if args.rounds > 1 else ""
            print(f"  {name}{where}: {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} tok/s", flush=True)
    table = []
    for name in args.systems:
        tokens, seconds = sorted(runs[name], key=lambda run: run[1])[(len(runs[name]) - 1) // 2]  # the median
        table.append((name, tokens, seconds, tokens / seconds, "/".join(f"{s:.1f}" for _, s in runs[name])))
    base = {name: tps for name, _, _, tps, _ in table}
    floor = None if args.no_floor else floor_for(args.model, [len(p) for p in prompts], args.new_tokens)
    print("\n| system | output tokens | seconds | output tok/s | lmserve / system | floor / system | rounds' seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, tokens, seconds, tps, rounds in table:
        ratio = f"{base['lmserve'] / tps:.2f}x" if "lmserve" in base else "-"
        most = f"{seconds / floor.seconds:.2f}x" if floor else "-"
        print(f"| {name} | {tokens} | {seconds:.1f} | {tps:.1f} | {ratio} | {most} | {rounds} |")
    if args.rounds > 1:
        print(f"\nseconds: each system's median of {args.rounds} rounds (the lower middle one when even), systems "
              "in alternating order, every round on fresh prompts of the same lengths")
    if floor:
        print(f"\n{floor.describe()}; 'floor / system' is the most any system doing this arithmetic in this "
              "precision could gain over that one")
    if "lmserve" in GENERATED and len(GENERATED) > 1:
        print("\n| greedy agreement with lmserve (mean share of each output before the first difference) | |")
        print("|---|---:|")
        for name, ids in GENERATED.items():
            if name != "lmserve":
                print(f"| {name} | {agreement(GENERATED['lmserve'], ids):.0%} |")
    if not args.no_single_stream and "lmserve" in args.systems:
        print("\n| single stream (1 request, decode) | tok/s |")
        print("|---|---:|")
        for name, tps in single_stream(args.model, vocab, args):
            print(f"| {name} | {tps:.1f} |")


if __name__ == "__main__":
    main()
