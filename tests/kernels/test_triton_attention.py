"""The Triton paged-attention kernel against the pure-torch reference and a float64 oracle.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) on small shapes; the
same cases run compiled on a CUDA device (marked gpu). Each case mixes decodes, a whole prefill and
a chunked prefill (new tokens after cached ones) in one ragged batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmserve.kernels import ReferenceOps
from lmserve.models.layers import alibi_slopes

from .paged import PagedBatch, make_batch, naive_attention

pytest.importorskip("triton")
from lmserve.kernels.triton import interpreting  # noqa: E402
from lmserve.kernels.triton.paged_attention import paged_attention  # noqa: E402

SCALE = 0.125
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """CPU tensors through the interpreter (tests/conftest.py turns it on without a GPU), or CUDA
    tensors through the compiled kernel. Triton runs one way per process, chosen at its import."""
    if (request.param == "interpreter") != interpreting():
        pytest.skip(f"triton runs {'interpreted' if interpreting() else 'compiled'} in this process")
    return "cpu" if request.param == "interpreter" else "cuda"


def _run(b: PagedBatch, device: str, slopes: torch.Tensor | None = None) -> torch.Tensor:
    args = [t.to(device) for t in b.args()]
    return paged_attention(*args, SCALE, None if slopes is None else slopes.to(device)).float().cpu()


def _check(b: PagedBatch, device: str, slopes: torch.Tensor | None = None) -> None:
    got = _run(b, device, slopes)
    ref = ReferenceOps("cpu").paged_attention(*b.args(), SCALE, slopes)
    torch.testing.assert_close(got, ref.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got, naive_attention(b, SCALE, slopes), rtol=2e-3, atol=2e-3)


# (new tokens, context) per sequence, then heads, KV heads, head dim, block size
CASES = {
    "decode-gqa3-d64-bs16": ([1, 1, 1], [5, 33, 16], 9, 3, 64, 16),
    "mixed-gqa4-d128-bs32": ([1, 20, 7, 1], [40, 20, 71, 33], 8, 2, 128, 32),
    "mixed-mha-d64-bs32": ([3, 1, 18], [3, 65, 40], 4, 4, 64, 32),
    "prefill-gqa2-d128-bs16": ([37, 5], [37, 21], 4, 2, 128, 16),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference_on_ragged_batches(case: tuple, device: str) -> None:
    new, ctx, hq, hkv, d, bs = case
    b = make_batch(new, ctx, hq, hkv, d, bs)
    _check(b, device)


def test_sequences_sharing_prefix_blocks(device: str) -> None:
    # Three sequences read the same two cached prefix blocks, then blocks of their own; one of them
    # is a chunked prefill whose new tokens start inside the shared prefix's successor block.
    b = make_batch([1, 6, 1], [40, 45, 33], 6, 2, 64, 16, seed=3)
    b.block_tables[1, :2] = b.block_tables[0, :2]
    b.block_tables[2, :2] = b.block_tables[0, :2]
    _check(b, device)


def test_alibi_and_fp32_queries_over_bf16_cache(device: str) -> None:
    b = make_batch([1, 9], [30, 9], 8, 2, 64, 16, seed=5)
    assert b.k_cache.dtype == torch.bfloat16 and b.q.dtype == torch.float32
    _check(b, device, alibi_slopes(8))


def test_writes_into_out_and_keeps_q_dtype(device: str) -> None:
    b = make_batch([1, 4], [17, 4], 4, 2, 64, 16, seed=7)
    q = b.q.to(torch.bfloat16).to(device)
    out = torch.full_like(q, float("nan"))
    args = [t.to(device) for t in b.args()[1:]]
    result = paged_attention(q, *args, SCALE, None, out)
    assert result is out and out.dtype == torch.bfloat16
    b.q = q.float().cpu()
    torch.testing.assert_close(out.float().cpu(), naive_attention(b, SCALE), rtol=2e-2, atol=2e-2)


def test_refuses_heads_that_do_not_group() -> None:
    b = make_batch([1], [4], 6, 4, 64, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_attention(*b.args(), SCALE)


def test_queries_as_a_strided_view_of_fused_qkv(device: str) -> None:
    # The model hands over q as a view into its fused q|k|v projection: rows are not contiguous.
    b = make_batch([1, 5], [12, 5], 4, 2, 64, 16, seed=9)
    qkv = torch.randn(b.q.shape[0], (4 + 2 * 2) * 64)
    qkv[:, :4 * 64] = b.q.reshape(-1, 4 * 64)
    strided = qkv[:, :4 * 64].reshape(-1, 4, 64)
    assert not strided.is_contiguous()
    args = [t.to(device) for t in b.args()[1:]]
    got = paged_attention(strided.to(device), *args, SCALE).float().cpu()
    torch.testing.assert_close(got, naive_attention(b, SCALE), rtol=2e-3, atol=2e-3)


def test_compiles_for_hopper_without_a_gpu() -> None:
    # The interpreter accepts programs the compiler refuses (types of loop-carried values, dot
    # shapes): compile the real thing for sm_90 in a process without the interpreter.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_aot.py")), "90"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("cubin of") == 3  # two attention variants, then norm and rotary
