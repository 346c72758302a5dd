"""CPU kernel benchmark: the compiled ops against torch and the pure-torch fallback.

    python benchmarks/kernels_cpu.py [--threads N] [--rounds 7] [--only linear,mlp,fused,attention,norm,choice]

``choice`` times the linear kernel candidates the engine chooses between at load (own panels, torch
bf16, torch fp32; ``lmserve/kernels/choice.py``) through the same ``Ops`` calls the engine makes, and
shows which each shape would run from which M. ``LMSERVE_CPU_ISA=avx2`` benchmarks the AVX2 build.

Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, 9 query / 3 KV heads of 64, vocab 49152).
Candidates are timed round-robin, so load from other processes hits them alike; each cell is the
median over rounds. Ratios compare candidates measured in the same run only. Timings are warm-cache:
each sample first runs its candidate once untimed, so weights and KV blocks sit in the last-level
cache when they fit (a whole model's weights and KV cache usually do not; then DRAM bandwidth rules).
Decode attention is also timed out of cache, each call on the next of enough copies of the batch's
KV cache to pass any last-level cache, as a decode step's layers follow each other.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from lmserve.kernels import Ops, PackedLinear, ReferenceOps, get_ops
from lmserve.kernels.candidates import CANDIDATES, unavailable
from lmserve.kernels.choice import plan_for
from lmserve.kernels.machine import FLAGS_THAT_MATTER, cpu_flags, cpu_model

LINEAR_SHAPES = {  # name: (out, in)
    "q/o": (576, 576), "k/v": (192, 576), "qkv": (960, 576), "gate/up": (1536, 576),
    "gate|up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576),
}
LINEAR_M = (1, 8, 32, 64, 128, 256, 512)
LM_HEAD_M = (1, 8, 32)  # only sampled rows reach the LM head


def timed(fn: Callable[[], object], min_s: float = 2e-3) -> Callable[[], float]:
    """A sampler returning seconds per call; cheap calls are looped to stay above timer noise."""
    fn()
    start, calls = time.perf_counter(), 1
    fn()
    once = time.perf_counter() - start
    calls = max(1, int(min_s / max(once, 1e-7)))

    def sample() -> float:
        fn()  # untimed: the other candidates may have evicted this one's data from the caches
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls

    return sample


def race(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate, sampled round-robin."""
    samplers = {name: timed(fn) for name, fn in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, sample in samplers.items():
            samples[name].append(sample())
    return {name: statistics.median(s) for name, s in samples.items()}


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n## {title}\n")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def bench_linear(ops: Ops, rounds: int) -> None:
    rows = []
    for name, (n, k) in LINEAR_SHAPES.items():
        w = torch.randn(n, k).bfloat16()
        packed, w32 = ops.pack_linear_weight(w), w.float()
        for m in LM_HEAD_M if name == "lm_head" else LINEAR_M:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            t = race({"ours": partial(ops.linear, x, packed), "bf16": partial(F.linear, xb, w),
                      "fp32": partial(F.linear, x, w32)}, rounds)
            gf = {c: 2 * m * n * k / s / 1e9 for c, s in t.items()}
            rows.append([name, f"{m}", f"{n}x{k}", f"{t['ours'] * 1e6:.1f}", f"{gf['ours']:.0f}",
                         f"{n * k * 2 / t['ours'] / 1e9:.1f}", f"{gf['bf16']:.0f}", f"{gf['fp32']:.0f}",
                         f"{t['bf16'] / t['ours']:.2f}x", f"{t['fp32'] / t['ours']:.2f}x"])
    table("linear: y = x W^T, bf16 weights, fp32 activations",
          ["layer", "M", "N x K", "ours us", "ours GF/s", "ours W GB/s", "torch bf16 GF/s", "torch fp32 GF/s",
           "vs bf16", "vs fp32"], rows)


def torch_mlp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    g, u = F.linear(x, w).chunk(2, dim=-1)
    return F.silu(g) * u


def unfused_mlp(ops: Ops, x: torch.Tensor, w: PackedLinear) -> torch.Tensor:
    return ops.silu_and_mul(ops.linear(x, w))


def bench_mlp(ops: Ops, rounds: int) -> None:
    rows = []
    gate, up = torch.randn(1536, 576).bfloat16(), torch.randn(1536, 576).bfloat16()
    fused, plain = ops.pack_gate_up_weight(gate, up), ops.pack_linear_weight(torch.cat([gate, up]))
    wb, w32 = torch.cat([gate, up]), torch.cat([gate, up]).float()

    for m in (1, 8, 64, 256):
        x = torch.randn(m, 576)
        xb = x.bfloat16()
        t = race({"fused": partial(ops.linear_silu_mul, x, fused), "unfused": partial(unfused_mlp, ops, x, plain),
                  "bf16": partial(torch_mlp, xb, wb), "fp32": partial(torch_mlp, x, w32)}, rounds)
        rows.append([f"{m}", *(f"{t[c] * 1e6:.1f}" for c in ("fused", "unfused", "bf16", "fp32")),
                     f"{t['unfused'] / t['fused']:.2f}x", f"{t['bf16'] / t['fused']:.2f}x"])
    table("gate|up projection + SwiGLU (576 -> 2x1536 -> 1536)",
          ["M", "linear_silu_mul us", "linear+silu_and_mul us", "torch bf16 us", "torch fp32 us",
           "fused vs unfused", "fused vs bf16"], rows)


FUSED_M = (1, 8, 32, 128, 512)  # decode batches, then prefill chunks


def ab(a: Callable[[], object], b: Callable[[], object], rounds: int) -> tuple[float, float, float]:
    """Median seconds per call of ``a`` and of ``b``, and the median of the per-round ratios b / a.
    Rounds alternate a, b, a, b; a ratio within one round is what other processes' load distorts least."""
    sa, sb = timed(a), timed(b)
    ta, tb, ratios = [], [], []
    for _ in range(rounds):
        x, y = sa(), sb()
        ta.append(x)
        tb.append(y)
        ratios.append(y / x)
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def bench_fused(ops: Ops, rounds: int) -> None:
    """``GateUpSwiGLU``'s fused kernel against the projection and ``silu_and_mul`` it replaces.

    A residual add fused into the down projection's epilogue was measured here too and removed: in a
    decoder layer the add already happens inside the next ``rms_norm``, and moving it into the GEMM
    gained nothing past one row (unfused/fused 0.97-1.00 at M 8 to 512, 1.03-1.13 at M 1).
    """
    gate, up = torch.randn(1536, 576).bfloat16(), torch.randn(1536, 576).bfloat16()
    gate_up, plain_gate_up = ops.pack_gate_up_weight(gate, up), ops.pack_linear_weight(torch.cat([gate, up]))
    rows = []
    for m in FUSED_M:
        x = torch.randn(m, 576)
        tf, tu, ratio = ab(partial(ops.linear_silu_mul, x, gate_up), partial(unfused_mlp, ops, x, plain_gate_up),
                           rounds)
        rows.append(["gate|up + SwiGLU", f"{m}", f"{tf * 1e6:.1f}", f"{tu * 1e6:.1f}", f"{ratio:.3f}"])
    table(f"fused vs unfused, bf16 weights, fp32 activations (median of {rounds} alternated rounds; "
          "ratio > 1: fused faster)",
          ["op", "M", "fused us", "unfused us", "unfused/fused"], rows)


def paged(new: list[int], ctx: list[int], dtype: torch.dtype, block_size: int = 16) -> tuple[torch.Tensor, ...]:
    """A SmolLM2-shaped paged batch with each sequence's blocks scattered over the cache."""
    needs = [-(-c // block_size) for c in ctx]
    blocks = sum(needs)
    k_cache = torch.randn(blocks, block_size, 3, 64).to(dtype)
    v_cache = torch.randn(blocks, block_size, 3, 64).to(dtype)
    order = torch.randperm(blocks).to(torch.int32)
    tables = torch.zeros(len(ctx), max(needs), dtype=torch.int32)
    used = 0
    for s, need in enumerate(needs):
        tables[s, :need] = order[used:used + need]
        used += need
    starts = torch.zeros(len(new) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(new).cumsum(0)
    q = torch.randn(int(starts[-1]), 9, 64)
    return q, k_cache, v_cache, tables, torch.tensor(ctx, dtype=torch.int32), starts


COLD_BYTES = 512 << 20  # more than any last-level cache, as a model's KV cache at decode is


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """A call that runs the next of ``calls`` each time: data of its own each, as layers have."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def attention_flops(new: list[int], ctx: list[int]) -> float:
    """Useful FLOPs: QK^T and PV over the causal keys of every new token, 9 heads of 64."""
    return sum(4 * 9 * 64 * (n * c - n * (n - 1) / 2) for n, c in zip(new, ctx, strict=True))


def bench_attention(ops: Ops, rounds: int) -> None:
    ref = ReferenceOps("cpu")
    gen = torch.Generator().manual_seed(0)
    decode_ctx = [int(c) for c in torch.randint(300, 401, (64,), generator=gen)]
    cases = {
        "decode 64 x ~350, bf16": ([1] * 64, decode_ctx, torch.bfloat16),
        "decode 64 x ~350, fp32": ([1] * 64, decode_ctx, torch.float32),
        "decode 1 x 4000, bf16": ([1], [4000], torch.bfloat16),
        "prefill 512, bf16": ([512], [512], torch.bfloat16),
        "prefill 512, fp32": ([512], [512], torch.float32),
        "chunk 128 over 1024 cached, bf16": ([128], [1152], torch.bfloat16),
        "mixed: 256 chunk + 63 decodes, bf16": ([256] + [1] * 63, [256] + decode_ctx[:63], torch.bfloat16),
    }
    rows = []
    for name, (new, ctx, dtype) in cases.items():
        args = paged(new, ctx, dtype)
        scale = 1 / math.sqrt(64)
        candidates = {"ours": partial(ops.paged_attention, *args, scale),
                      "fallback": partial(ref.paged_attention, *args, scale)}
        if len(new) == 1 and new[0] > 1:  # SDPA on contiguous fp32 tensors, KV heads expanded
            n, c = new[0], ctx[0]
            q, k, v = torch.randn(1, 9, n, 64), torch.randn(1, 9, c, 64), torch.randn(1, 9, c, 64)
            mask = torch.ones(n, c, dtype=torch.bool).tril(c - n)
            causal = {"is_causal": True} if n == c else {"attn_mask": mask}
            candidates["sdpa"] = partial(F.scaled_dot_product_attention, q, k, v, **causal)
        kv_bytes = sum(ctx) * 3 * 64 * 2 * args[1].element_size()
        if all(n == 1 for n in new):
            copies = [args] + [paged(new, ctx, dtype) for _ in range(COLD_BYTES // kv_bytes)]
            candidates["cold"] = rotating([partial(ops.paged_attention, *c, scale) for c in copies])
        t = race(candidates, rounds)
        sdpa = f"{t['sdpa'] * 1e3:.3f}" if "sdpa" in t else "-"
        cold = f"{kv_bytes / t['cold'] / 1e9:.1f}" if "cold" in t else "-"
        rows.append([name, f"{t['ours'] * 1e3:.3f}", f"{attention_flops(new, ctx) / t['ours'] / 1e9:.0f}",
                     f"{kv_bytes / t['ours'] / 1e9:.1f}", cold, f"{t['fallback'] * 1e3:.3f}", sdpa,
                     f"{t['fallback'] / t['ours']:.2f}x",
                     f"{t['ours'] / t['sdpa']:.2f}" if "sdpa" in t else "-"])
    table("paged attention (9 q heads, 3 KV heads, head_dim 64, block 16)",
          ["case", "ours ms", "ours GF/s", "ours KV GB/s", "out of cache KV GB/s", "fallback ms", "sdpa ms",
           "fallback/ours", "ours/sdpa"], rows)


def bench_norm(ops: Ops, rounds: int) -> None:
    ref = ReferenceOps("cpu")
    rows = []
    for m in (1, 64, 512):
        x, r, w = torch.randn(m, 576), torch.randn(m, 576), torch.randn(576)
        t = race({"ours": partial(ops.rms_norm, x, w, 1e-5, r), "torch": partial(ref.rms_norm, x, w, 1e-5, r)}, rounds)
        rows.append(["add+rms_norm 576", f"{m}", f"{t['ours'] * 1e6:.1f}", f"{t['torch'] * 1e6:.1f}",
                     f"{t['torch'] / t['ours']:.2f}x"])
        g = torch.randn(m, 3072)
        t = race({"ours": partial(ops.silu_and_mul, g), "torch": partial(ref.silu_and_mul, g)}, rounds)
        rows.append(["silu_and_mul 1536", f"{m}", f"{t['ours'] * 1e6:.1f}", f"{t['torch'] * 1e6:.1f}",
                     f"{t['torch'] / t['ours']:.2f}x"])
    cache = torch.zeros(1000, 16, 3, 64, dtype=torch.bfloat16)
    for tokens in (1, 64, 512):
        k, v = torch.randn(tokens, 3, 64), torch.randn(tokens, 3, 64)
        slots = torch.randperm(16000)[:tokens]
        t = race({"ours": partial(ops.write_kv, k, v, cache, cache, slots),
                  "torch": partial(ref.write_kv, k, v, cache, cache, slots)}, rounds)
        rows.append(["write_kv bf16 cache", f"{tokens}", f"{t['ours'] * 1e6:.1f}", f"{t['torch'] * 1e6:.1f}",
                     f"{t['torch'] / t['ours']:.2f}x"])
    table("elementwise", ["op", "rows", "ours us", "torch us", "speedup"], rows)


def bench_choice(ops: Ops, rounds: int) -> None:
    """GFLOP/s of every kernel-choice candidate per M, and the plan the chooser makes from them."""
    rows = []
    for name, (n, k) in {**LINEAR_SHAPES, "gate|up+silu": (1536, 576)}.items():
        if name in ("gate|up", "gate/up"):
            continue  # the engine runs gate|up fused with SwiGLU (the row above)
        fused = name.endswith("+silu")
        w = (ops.pack_gate_up_weight(torch.randn(n, k).bfloat16(), torch.randn(n, k).bfloat16()) if fused
             else ops.pack_linear_weight(torch.randn(n, k).bfloat16()))
        if w.layout != "panel32":
            print(f"\n{ops.name} has no panel kernel: nothing to choose")
            return
        forms = {c: cand.prepare(w) for c, cand in CANDIDATES.items() if unavailable(c, ops) is None}
        call = ops.linear_silu_mul if fused else ops.linear
        timings, cells = {}, []
        for m in LM_HEAD_M if name == "lm_head" else (1, 2, 4, 8, 16, 32, *LINEAR_M[3:]):
            x = torch.randn(m, k)
            t = race({c: partial(call, x, f) for c, f in forms.items()}, rounds)
            timings[str(m)] = t
            flops = 2 * m * n * k * (2 if fused else 1)
            cells.append([name, f"{m}", *(f"{flops / t[c] / 1e9:.0f}" if c in t else "-" for c in CANDIDATES)])
        plan = plan_for(timings)
        for row in cells:
            row.append([c for start, c in plan if int(row[1]) >= start][-1])
        rows += cells
    table("kernel choice: GFLOP/s per candidate as the engine calls it, and the chosen one",
          ["layer", "M", *CANDIDATES, "chosen"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default="linear,mlp,fused,attention,norm,choice")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ops = get_ops("cpu")
    print(f"# lmserve CPU kernels: {ops.name}, torch {torch.__version__}, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds")
    flags = cpu_flags()
    print(f"# CPU: {cpu_model()}; flags: {' '.join(f for f in FLAGS_THAT_MATTER if f in flags)}")
    benches = {"linear": bench_linear, "mlp": bench_mlp, "fused": bench_fused, "attention": bench_attention,
               "norm": bench_norm, "choice": bench_choice}
    with torch.inference_mode():
        for name in args.only.split(","):
            benches[name](ops, args.rounds)


if __name__ == "__main__":
    main()
