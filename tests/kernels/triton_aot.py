"""Compile the Triton paged-attention kernel ahead of time for a CUDA architecture, on any machine
(Triton ships its own ptxas). Run as a script with TRITON_INTERPRET unset: the interpreter, which
the CPU tests use, replaces the compiler. Prints one line per variant compiled."""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmserve.kernels.triton import elementwise as ew
from lmserve.kernels.triton import paged_attention as pa

# (q and out dtype, cache dtype, head dim, group, tokens per tile, ALiBi)
VARIANTS = [("bf16", "bf16", 64, 3, 21, True), ("fp32", "fp32", 16, 2, 1, False)]


def compile_variant(arch: int, q: str, cache: str, head_dim: int, group: int, block_q: int, alibi: bool) -> int:
    consts = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE=16,
                  BLOCK_Q=block_q, BLOCK_M=max(16, triton.next_power_of_2(block_q * group)), BLOCK_N=64,
                  HAS_ALIBI=alibi, F32_DOT=cache == "fp32")
    types = {"q_ptr": f"*{q}", "out_ptr": f"*{q}", "k_ptr": f"*{cache}", "v_ptr": f"*{cache}", "tables_ptr": "*i32",
             "ctx_ptr": "*i32", "qsl_ptr": "*i32", "slopes_ptr": "*fp32", "scale": "fp32"}
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in pa._kernel.arg_names}
    kernel = triton.compile(ASTSource(pa._kernel, signature, consts), target=GPUTarget("cuda", arch, 32))
    return len(kernel.asm["cubin"])


def compile_elementwise(arch: int, dtype: str) -> int:
    target = GPUTarget("cuda", arch, 32)
    norm_consts = dict(HAS_RES=True, BLOCK=1024)
    norm_types = {"x_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                  "sum_ptr": f"*{dtype}", "eps": "fp32"}
    norm_sig = {n: "constexpr" if n in norm_consts else norm_types.get(n, "i32") for n in ew._rms_norm.arg_names}
    size = len(triton.compile(ASTSource(ew._rms_norm, norm_sig, norm_consts), target=target).asm["cubin"])
    rot_consts = dict(HALF=32, NEOX=True, BLOCK_H=16, BLOCK_R=32)
    rot_types = {"pos_ptr": "*i64", "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    rot_sig = {n: "constexpr" if n in rot_consts else rot_types.get(n, "i32") for n in ew._rotary.arg_names}
    return size + len(triton.compile(ASTSource(ew._rotary, rot_sig, rot_consts), target=target).asm["cubin"])


if __name__ == "__main__":
    for arch in map(int, sys.argv[1:] or ["90"]):
        for variant in VARIANTS:
            print(f"sm_{arch} {variant}: cubin of {compile_variant(arch, *variant)} bytes", flush=True)
        print(f"sm_{arch} norm and rotary: cubin of {compile_elementwise(arch, 'bf16')} bytes", flush=True)
