"""Linear weights copied onto transparent huge pages: the same values, nothing shared by mistake,
the memory advised as it should be, and alive as long as the weights."""

from __future__ import annotations

import gc
import mmap
import sys
from pathlib import Path

import pytest
import torch

from lmserve.config.settings import EngineConfig
from lmserve.engine.model_runner import ModelRunner
from lmserve.kernels import get_ops
from lmserve.kernels.packed import HUGE_PAGE, HugePageArena
from lmserve.models import loader
from lmserve.parallel.layers import LinearBase, RowParallelLinear
from lmserve.parallel.state import SINGLE
from tests.tiny_models import make_tiny_model

needs_advice = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                                  reason="transparent huge pages are a Linux feature")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _copy_and_drop_the_arena(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    arena = HugePageArena()
    arena.CHUNK = 4 << 20  # small chunks, so that this handful of tensors fills more than one
    return [arena.copy(t) for t in tensors]


@needs_advice
def test_copies_hold_the_same_values_apart_from_each_other_after_the_arena_is_gone() -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(1000, 1500).bfloat16(), torch.randint(0, 255, (12345,), dtype=torch.uint8),
               torch.randn(3, 777), torch.randn(1024, 1536)]  # the last is larger than a chunk
    copies = _copy_and_drop_the_arena(tensors)
    gc.collect()
    spans = []
    for t, c in zip(tensors, copies, strict=True):
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c, t)
        assert c.data_ptr() != t.data_ptr() and c.data_ptr() % HugePageArena.ALIGN == 0
        spans.append((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    assert copies[0].data_ptr() % HUGE_PAGE == 0  # a chunk's first tensor starts on a huge page
    assert copies[3].data_ptr() % HUGE_PAGE == 0  # too large for the chunk in use: a chunk of its own
    tensors[0].zero_()
    assert copies[0].abs().sum() > 0  # a copy, not a view of the source


@needs_advice
def test_the_copies_memory_is_advised_for_huge_pages() -> None:
    copy = HugePageArena().copy(torch.ones(64, 64))
    assert "hg" in _vm_flags(copy.data_ptr())


def test_without_the_advice_tensors_stay_where_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    t = torch.ones(8)
    assert HugePageArena().copy(t) is t


@needs_advice
def test_a_layer_keeps_its_routes_and_its_results_when_moved() -> None:
    ops = get_ops("cpu")
    torch.manual_seed(1)
    layer = RowParallelLinear(96, 64, bias=False, dtype=torch.bfloat16, state=SINGLE)
    layer.weight.data.copy_(torch.randn(64, 96))
    layer.finalize(ops)
    assert layer.packed is not None
    small = layer.packed
    large = type(small)(small.data.clone(), small.out_features, small.in_features, small.layout)
    layer.route([(1, small), (16, large)])
    x = torch.randn(20, 96)
    before_few, before_many = layer(x[:3]), layer(x)

    moved = layer.move_to_huge_pages(HugePageArena())

    assert moved == small.nbytes + large.nbytes
    assert layer.packed is not small and layer.packed.data.data_ptr() != small.data.data_ptr()
    assert "hg" in _vm_flags(layer.packed.data.data_ptr())
    assert layer.for_rows(x[:3]) is layer.packed  # the first route is still the layer's own form
    assert layer.for_rows(x) is not layer.packed and layer.for_rows(x).layout == large.layout
    assert torch.equal(layer(x[:3]), before_few) and torch.equal(layer(x), before_many)


def _runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(model_dir), dtype="bf16", device="cpu", max_model_len=48,
                                    block_size=4, kv_cache_tokens=64), progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model(path, "llama", tokenizer_dir)
    return path


@needs_advice
def test_a_cpu_engine_keeps_every_linear_weight_on_huge_pages(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "HUGE_PAGE_MIN_WEIGHT_BYTES", 0)  # the tiny model's few MiB count as large
    linears = [m for m in _runner(model_dir).model.modules() if isinstance(m, LinearBase)]
    assert linears
    for layer in linears:
        assert layer.packed is not None
        assert "hg" in _vm_flags(layer.packed.data.data_ptr()), type(layer).__name__


@needs_advice
def test_weights_that_fit_in_cache_stay_where_they_are(model_dir: Path) -> None:
    linears = [m for m in _runner(model_dir).model.modules() if isinstance(m, LinearBase)]
    assert sum(m.packed_nbytes for m in linears) < loader.HUGE_PAGE_MIN_WEIGHT_BYTES
    assert not any("hg" in _vm_flags(m.packed.data.data_ptr()) for m in linears if m.packed is not None)
