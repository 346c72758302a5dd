"""GPU throughput: lmserve against Hugging Face continuous batching (``generate_batch``), per model
shape, with lmserve's decode step set against the memory-bandwidth roofline.

Random-weight Llama models shaped like SmolLM2-135M, TinyLlama-1.1B and Llama-2-7B are written to a
temporary directory (no downloads). Workload per shape: 256 requests, prompts of 64-512 random
tokens, 128 new tokens each with end-of-sequence ignored; both systems run it in this one process.
The table gives output tokens/s of each and their ratio, lmserve's mean decode-step time at the
mean batch it decoded, and that step's roofline: the bytes it must read (weights, plus the KV cache
of every sequence in the batch at its mean context) over the bandwidth measured here by a
device-to-device copy. A batch-1 row per shape gives the per-token step time of one request.

    python benchmarks/gpu_throughput.py                       # all three shapes, on CUDA
    python benchmarks/gpu_throughput.py --shapes 135m --no-hf --eager-rows   # graphs on and off
    python benchmarks/gpu_throughput.py --smoke               # a tiny shape on the CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def warmup_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """The workload's first two prompts reversed: a warm-up on the workload's own prompts would leave
    their blocks in lmserve's prefix cache for the timed run."""
    return [p[::-1] for p in prompts[:2]]


SHAPES: dict[str, dict[str, Any]] = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}


# -- random models ---------------------------------------------------------------------------------
def write_random_llama(shape: str, out: Path, device: torch.device) -> None:
    """A Llama checkpoint of ``shape`` with N(0, 0.02) weights (made on ``device``, fast) and a
    word-level tokenizer covering its whole vocabulary."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16",
                      architectures=["LlamaForCausalLM"])
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    with torch.device("meta"):
        names = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size, part = 0, 0

    def flush() -> None:
        nonlocal shard, size, part
        name = f"model-{part:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        shard, size, part = {}, 0, part + 1

    for name, shp in names.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shp, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = t
        size += t.numel() * 2
        if size > 2 << 30:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    _write_tokenizer(out, cfg.vocab_size)


def _write_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(out)


def make_workload(vocab: int, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for length in lengths]


# -- measurements ----------------------------------------------------------------------------------
@dataclass
class RunStats:
    tokens: int
    seconds: float
    decode_steps: int = 0
    decode_seconds: float = 0.0
    decode_rows: int = 0  # sequences decoded, summed over decode steps
    decode_context: int = 0  # their context lengths, summed

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def step_ms(self) -> float:
        return 1e3 * self.decode_seconds / self.decode_steps if self.decode_steps else float("nan")

    @property
    def batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0

    @property
    def context(self) -> float:
        return self.decode_context / self.decode_rows if self.decode_rows else 0.0


def run_lmserve(llm: Any, prompts: list[list[int]], new_tokens: int) -> RunStats:
    """Drive the engine step by step; a step is a decode step when every sequence computes one token."""
    from lmserve import SamplingParams

    engine = llm.engine
    seen: dict[str, Any] = {}
    prepare = engine.runner.prepare

    def spy(requests: Any, num_new: Any) -> Any:
        seen["decode"] = all(n == 1 for n in num_new)
        seen["rows"], seen["context"] = len(num_new), sum(r.num_computed_tokens + 1 for r in requests)
        return prepare(requests, num_new)

    engine.runner.prepare = spy
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", p, params)
    stats = RunStats(0, 0.0)
    start = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            seen.clear()
            t0 = time.perf_counter()
            deltas = engine.step()
            dt = time.perf_counter() - t0
            stats.tokens += sum(len(d.token_ids) for d in deltas)
            if seen.get("decode"):
                stats.decode_steps += 1
                stats.decode_seconds += dt
                stats.decode_rows += seen["rows"]
                stats.decode_context += seen["context"]
    finally:
        engine.runner.prepare = prepare
    stats.seconds = time.perf_counter() - start
    return stats


def run_hf_batch(model_dir: Path, prompts: list[list[int]], new_tokens: int, device: torch.device) -> RunStats | str:
    """Hugging Face continuous batching on the same prompts; the error's text if it fails."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device.type == "cuda"
                                                     else torch.float32).to(device).eval()
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        model.generate_batch(inputs=warmup_prompts(prompts), generation_config=config)
        _sync(device)
        start = time.perf_counter()
        # no_grad, not inference_mode: generate_batch updates its cache in place outside it.
        with torch.no_grad():
            results = model.generate_batch(inputs=prompts, generation_config=config)
        _sync(device)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.generated_tokens) for r in results.values())
        del model, results
        return RunStats(tokens, seconds)
    except Exception as exc:  # a benchmark row, not a crash: the other rows are still worth having
        return f"failed: {type(exc).__name__}: {str(exc)[:120]}"


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write), the roofline's denominator."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * n * reps / (time.perf_counter() - start)


def step_bytes(shape: str, batch: float, context: float) -> float:
    """Bytes a decode step must read: every weight once (the embedding table only when it is also
    the LM head) and each sequence's keys and values, bf16."""
    s = SHAPES[shape]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    d = h // s["num_attention_heads"]
    kv_width = s["num_key_value_heads"] * d
    per_layer = h * (h + 2 * kv_width) + h * h + 3 * h * i + 2 * h
    weights = layers * per_layer + v * h + h  # LM head (tied or not) and the final norm
    kv = batch * context * 2 * layers * kv_width
    return 2.0 * (weights + kv)


def _release(device: torch.device) -> None:
    """Hand a finished system's device memory back (graph pools go with their last reference)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the run ---------------------------------------------------------------------------------------
def bench_shape(shape: str, args: argparse.Namespace, device: torch.device, bandwidth: float,
                root: Path) -> list[list[str]]:
    from lmserve import LLM

    model_dir = root / shape
    t0 = time.perf_counter()
    write_random_llama(shape, model_dir, device)
    vocab = SHAPES[shape]["vocab_size"]
    prompts = make_workload(vocab, args.num_requests, args.min_prompt, args.max_prompt)
    print(f"[{shape}] model written in {time.perf_counter() - t0:.1f}s", flush=True)
    # Hugging Face first: lmserve then sizes its KV cache from the memory HF has handed back.
    hf = run_hf_batch(model_dir, prompts, args.new_tokens, device) if args.hf else "skipped"
    _release(device)
    print(f"[{shape}] Hugging Face done at {time.perf_counter() - t0:.1f}s", flush=True)
    llm = LLM(str(model_dir), device=device.type, dtype="bf16" if device.type == "cuda" else "fp32",
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_prompt + args.new_tokens + 16)
    run_lmserve(llm, warmup_prompts(prompts), 4)  # kernels compiled (graphs were captured at load)
    ours = run_lmserve(llm, prompts, args.new_tokens)
    single_len = min(128, args.max_prompt)
    single = run_lmserve(llm, make_workload(vocab, 1, single_len, single_len, seed=1), args.new_tokens)
    graphs = getattr(llm.engine.runner, "decode_graphs", None)
    graph_note = "none" if graphs is None else f"{graphs.replays} replays, {graphs.eager_fallbacks} eager steps"
    del llm, graphs
    _release(device)
    runs = [(f"{shape} x{len(prompts)}", ours, hf), (f"{shape} batch-1", single, None)]
    if args.eager_rows:  # what the decode graphs buy: the same runs with graphs off
        llm = LLM(str(model_dir), device=device.type, dtype="bf16" if device.type == "cuda" else "fp32",
                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_prompt + args.new_tokens + 16,
                  enforce_eager=True)
        run_lmserve(llm, warmup_prompts(prompts), 4)
        runs.append((f"{shape} x{len(prompts)} eager", run_lmserve(llm, prompts, args.new_tokens), None))
        single_prompt = make_workload(vocab, 1, single_len, single_len, seed=1)
        runs.append((f"{shape} batch-1 eager", run_lmserve(llm, single_prompt, args.new_tokens), None))
        del llm
        _release(device)
    rows = []
    for label, st, other in runs:
        roof_ms = 1e3 * step_bytes(shape, st.batch, st.context) / bandwidth
        hf_cell = ratio = "-"
        if isinstance(other, RunStats):
            hf_cell, ratio = f"{other.tok_s:,.0f}", f"{st.tok_s / other.tok_s:.1f}x"
        elif isinstance(other, str):
            hf_cell = other
        rows.append([label, f"{st.tok_s:,.0f}", hf_cell, ratio, _ms(st.step_ms), f"{st.batch:.0f}",
                     f"{st.context:.0f}", _ms(roof_ms), f"{roof_ms / st.step_ms:.0%}" if st.decode_steps else "-"])
    print(f"[{shape}] done in {time.perf_counter() - t0:.1f}s; decode graphs: {graph_note}", flush=True)
    return rows


def _ms(value: float) -> str:
    """Milliseconds with two decimals, or two significant digits below 0.01 (a tiny model's roofline
    on a fast machine would otherwise read 0.00)."""
    return f"{value:.2f}" if value >= 0.01 else f"{value:.2g}"


HEADER = ["run", "lmserve tok/s", "HF generate_batch tok/s", "ratio", "decode step ms", "batch", "mean ctx",
          "roofline ms", "of roofline"]


def print_table(rows: list[list[str]]) -> None:
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="135m,1.1b,7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="lmserve only")
    parser.add_argument("--eager-rows", action="store_true",
                        help="also run lmserve with CUDA graphs off (option.enforce_eager), to show what they buy")
    parser.add_argument("--smoke", action="store_true", help="the tiny shape, few short requests, on the CPU")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.num_requests, args.min_prompt, args.max_prompt = "tiny", 6, 8, 24
        args.new_tokens, args.max_num_seqs = 8, 4
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    bandwidth = measure_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; measured copy bandwidth {bandwidth / 1e9:,.0f} GB/s; torch {torch.__version__}")
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="lmserve-gpu-bench-") as tmp:
        for shape in args.shapes.split(","):
            rows += bench_shape(shape.strip(), args, device, bandwidth, Path(tmp))
            print_table(rows)  # so far: a timeout later still leaves the finished shapes' rows
            rmtree_quiet(Path(tmp) / shape.strip())


def rmtree_quiet(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
