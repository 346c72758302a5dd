"""CUDA gets torch's own ops with the Triton attention (the pure-torch ops without Triton): the same
semantics on the device."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels import ReferenceOps, get_ops
from lmserve.kernels.cuda import CudaOps
from lmserve.kernels.triton import available as triton_available

from .paged import make_batch, naive_attention

pytestmark = pytest.mark.gpu


def test_cuda_gets_torch_ops_with_triton_attention() -> None:
    ops = get_ops("cuda")
    assert isinstance(ops, ReferenceOps)
    assert isinstance(ops, CudaOps) == triton_available()


def test_attention_and_linear_on_cuda() -> None:
    ops = ReferenceOps("cuda")
    b = make_batch([1, 20, 1], [40, 20, 90])
    want = naive_attention(b, 0.125)
    got = ops.paged_attention(*(t.cuda() for t in b.args()), 0.125)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    w, x = torch.randn(100, 64, device="cuda").bfloat16(), torch.randn(3, 64, device="cuda").bfloat16()
    y = ops.linear(x, ops.pack_linear_weight(w))
    torch.testing.assert_close(y.float(), (x.float() @ w.float().T), rtol=2e-2, atol=5e-2)
