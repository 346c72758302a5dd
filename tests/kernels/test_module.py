"""``kernels.Module``: an ``nn.Module`` called straight through ``forward``, its children found
without torch's ``__getattr__``, and otherwise the ``nn.Module`` every torch tool expects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmserve.kernels import Module


class Scaled(Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.full((2,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


def test_a_call_is_its_forward_and_a_child_always_reads_back_as_the_registered_one() -> None:
    m = Scaled()
    x = torch.ones(1, 2)
    assert torch.equal(m(x), m.inner(x) * 3)
    m.inner = nn.Linear(2, 2, bias=False)  # replaced: the new child, in forward and in the registry
    assert m.inner is m._modules["inner"] and m.inner.bias is None
    assert torch.equal(m(x), m._modules["inner"](x) * 3)
    m.inner = None  # cleared
    assert m.inner is None and m._modules["inner"] is None
    m.inner = nn.Linear(2, 2)
    del m.inner  # removed: no copy of it is left behind to answer for it
    with pytest.raises(AttributeError):
        _ = m.inner
    assert "inner" not in dict(m.named_children())


def test_parameters_state_dicts_and_device_moves_work_as_on_nn_module() -> None:
    a, b = Scaled(), Scaled()
    b.load_state_dict(a.state_dict())
    assert sorted(a.state_dict()) == ["inner.bias", "inner.weight", "scale"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    moved = b.to(torch.float64)  # parameters may be new objects: they are never cached
    assert moved.scale.dtype == torch.float64 and moved(torch.ones(1, 2, dtype=torch.float64)).dtype == torch.float64
