"""The Triton RMS norm and rotary kernels against the pure-torch ops, and a model on all the CUDA ops,
in Triton's interpreter on the CPU (compiled, on a CUDA device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.kernels import ReferenceOps
from lmserve.kernels import ops as ops_module
from lmserve.kernels.cuda import CudaOps
from tests.tiny_models import make_tiny_model

pytest.importorskip("triton")
from lmserve.kernels.triton import interpreting  # noqa: E402
from lmserve.kernels.triton.elementwise import rms_norm, rotary_embedding  # noqa: E402

REF = ReferenceOps("cpu")


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    if (request.param == "interpreter") != interpreting():
        pytest.skip(f"triton runs {'interpreted' if interpreting() else 'compiled'} in this process")
    return "cpu" if request.param == "interpreter" else "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(device: str, dtype: torch.dtype, with_residual: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g).to(dtype)
    residual = torch.randn(5, 96, generator=g).to(dtype) if with_residual else None
    weight = (torch.rand(96, generator=g) + 0.5).to(dtype)
    want, want_sum = REF.rms_norm(x, weight, 1e-5, residual)
    got, got_sum = rms_norm(x.to(device), weight.to(device), 1e-5, None if residual is None else residual.to(device))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert got.dtype == dtype and got_sum.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, **tol)
    # fp32 sums are exact; bf16 ones within one bf16 step (the interpreter's float32 -> bf16 cast
    # does not round as torch does; the GPU's does).
    sum_tol = dict(rtol=0.0, atol=0.0) if dtype == torch.float32 else dict(rtol=2**-7, atol=0.0)
    torch.testing.assert_close(got_sum.cpu(), want_sum, **sum_tol)


@pytest.mark.parametrize(("neox", "rotary_dim"), [(True, 64), (False, 64), (True, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_the_reference_in_place_on_fused_qkv_views(device: str, neox: bool, rotary_dim: int,
                                                                   dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d, t = 6, 2, 64, 7
    freqs = torch.outer(torch.arange(100.0), 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2) / rotary_dim))
    cos, sin = freqs.cos(), freqs.sin()
    positions = torch.tensor([0, 3, 4, 9, 50, 99, 1])
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    want = qkv.clone()
    REF.rotary_embedding(positions, want[:, :heads * d].view(t, heads, d),
                         want[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d), cos, sin, rotary_dim, neox)
    got = qkv.to(device)
    rotary_embedding(positions.to(device), got[:, :heads * d].view(t, heads, d),
                     got[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d), cos.to(device), sin.to(device),
                     rotary_dim, neox)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.cpu(), want, **tol)
    assert torch.equal(got.cpu()[:, (heads + kv_heads) * d:], qkv[:, (heads + kv_heads) * d:])  # v untouched


def test_a_model_on_the_cuda_ops_decodes_as_on_the_reference_ops(
        device: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tokenizer_dir: Path) -> None:
    # The three Triton kernels inside a real model (fused q|k|v views, in-place rotary, norms with
    # residuals, chunked prompts): greedy tokens as with the pure-torch ops.
    make_tiny_model(tmp_path, "llama", tokenizer_dir)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [4, 3, 2, 1, 20, 21, 22]]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    kwargs = dict(dtype="fp32", device=device, max_model_len=64, block_size=4, max_num_batched_tokens=8,
                  max_num_seqs=4)  # the budget is never below max_num_seqs
    monkeypatch.setitem(ops_module._by_device_type, device, ReferenceOps(device))
    want = [o.token_ids for o in LLM(str(tmp_path), **kwargs).generate(prompts, params)]
    monkeypatch.setitem(ops_module._by_device_type, device, CudaOps(device))
    llm = LLM(str(tmp_path), **kwargs)
    assert isinstance(llm.engine.runner.ops, CudaOps)  # type: ignore[attr-defined]
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
