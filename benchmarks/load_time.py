"""Model load time: cold start (convert, then load) against warm start (load the cached conversion).

For each model and tensor-parallel degree this prints, in seconds:

- ``live``: loading every rank straight from the original checkpoint (no cache at all; best of 2),
- ``convert``: writing the pre-sharded conversion,
- ``cold``: ``convert`` plus loading from it (the first start),
- ``warm``: loading from the cached conversion (every later start; best of 2),
- ``cold/warm`` and ``live/warm``.

A load is ``lmserve.models.loader.load_model`` for one rank, kernel repacking included, followed by
reading every byte of the weights once (safetensors files are memory-mapped, so a load alone would
defer the reading to the first requests). Ranks load in parallel processes when serving, so the time
of a start is the slowest rank's and that is what is reported (ranks are timed one after another
here). Warm loads read files the conversion just wrote, so they come from the page cache, as a
restart on the same machine would; after a reboot they would come from the disk.

Models: ``default`` (SmolLM2-135M-Instruct, fp32 on disk) and ``llama-1b`` (a random Llama of about
1.1B parameters written to a temporary directory in bf16, deleted afterwards).

    python benchmarks/load_time.py [--models default,llama-1b] [--tp 1,2] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                model_type="llama", torch_dtype="bfloat16")


def write_random_llama(out: Path, config: dict) -> Path:
    """A Llama checkpoint of random bf16 weights (one safetensors file), without building a model."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    h, inter, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"]
    kv_rows = kv * h // config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv_rows, h),
                       p + "self_attn.v_proj.weight": (kv_rows, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    os.sync()  # or the timings below would share the disk with this file's write-back
    params = sum(t.numel() for t in tensors.values())
    print(f"wrote a random Llama of {params / 1e9:.2f}B parameters to {out}")
    return out


def load_all_ranks(model_dir: Path, degree: int, dtype: torch.dtype) -> float:
    """Seconds the slowest rank takes to load (ranks timed one after another)."""
    from lmserve.kernels import get_ops
    from lmserve.models.loader import load_model
    from lmserve.parallel.state import ParallelState

    ops, slowest = get_ops("cpu"), 0.0
    for rank in range(degree):
        start = time.perf_counter()
        model, _ = load_model(model_dir, dtype, torch.device("cpu"), ops, state=ParallelState(rank, degree))
        touch(model)
        slowest = max(slowest, time.perf_counter() - start)
        del model
    return slowest


def touch(model: torch.nn.Module) -> None:
    """Read every byte of the loaded weights. Tensors loaded from safetensors files are memory-mapped,
    so without this a load would look free and the first requests would pay for the reading."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m._packed.data for m in model.modules() if getattr(m, "_packed", None) is not None]
    for t in tensors:
        t.clone()


def measure(model_dir: Path, degree: int, dtype: torch.dtype) -> dict[str, float]:
    from lmserve.convert import ensure_converted
    from lmserve.parallel.presharded import cache_entry

    entry = cache_entry(model_dir, degree, dtype)
    existed = entry.exists()
    shutil.rmtree(entry, ignore_errors=True)
    try:
        live = min(load_all_ranks(model_dir, degree, dtype) for _ in range(2))  # no entry: the original
        start = time.perf_counter()
        ensure_converted(model_dir, degree, dtype, progress=False)
        convert = time.perf_counter() - start
        first = load_all_ranks(model_dir, degree, dtype)
        warm = min(load_all_ranks(model_dir, degree, dtype) for _ in range(2))
    finally:
        if not existed:
            shutil.rmtree(entry, ignore_errors=True)  # leave the cache as it was found
    return {"live": live, "convert": convert, "cold": convert + first, "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,llama-1b")
    parser.add_argument("--tp", default="1,2", help="comma-separated degrees")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    from lmserve.dtypes import torch_dtype
    from lmserve.kernels import get_ops

    dtype, degrees = torch_dtype(args.dtype), [int(d) for d in args.tp.split(",")]
    get_ops("cpu")  # build or load the CPU kernels now, not inside the first timing
    rows, scratch = [], Path(tempfile.mkdtemp(prefix="lmserve-load-time-"))
    try:
        for name in args.models.split(","):
            if name == "default":
                from lmserve.store.default_model import pull_default_model

                model_dir = pull_default_model(progress=False)
            elif name == "llama-1b":
                model_dir = write_random_llama(scratch / "llama-1b", LLAMA_1B)
            else:
                model_dir = Path(name)
            for degree in degrees:
                t = measure(model_dir, degree, dtype)
                rows.append((name, degree, t))
                print(f"measured {name} tp{degree}: {t}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nload time, {args.dtype}, CPU, {torch.get_num_threads()} threads (seconds; slowest rank)")
    header = f"{'model':<10} {'tp':>3} {'live':>8} {'convert':>8} {'cold':>8} {'warm':>8} {'cold/warm':>10} {'live/warm':>10}"
    print(header)
    print("-" * len(header))
    for name, degree, t in rows:
        print(f"{name:<10} {degree:>3} {t['live']:>8.2f} {t['convert']:>8.2f} {t['cold']:>8.2f} {t['warm']:>8.2f} "
              f"{t['cold'] / t['warm']:>9.1f}x {t['live'] / t['warm']:>9.1f}x")


if __name__ == "__main__":
    main()
