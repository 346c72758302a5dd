"""Quantized weights in the conversion cache: stored under their own name, restored instead of redone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve.convert import convert
from lmserve.convert.converter import store_quantized
from lmserve.kernels import get_ops
from lmserve.kernels import quant as quant_module
from lmserve.kernels.quant import QuantLinear
from lmserve.models import loader as loader_module
from lmserve.models.loader import load_model
from lmserve.models.quantize import cache_name, dot_layouts
from lmserve.parallel.layers import LinearBase
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("private_cache")
OPS = get_ops("cpu")  # the kernels lmserve convert packs for


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, Path]:
    source = tmp_path_factory.mktemp("llama")
    make_tiny_model(source, "llama", tokenizer_dir)
    out = convert(source, tmp_path_factory.mktemp("conv") / "out", 1, "fp32", progress=False)
    assert store_quantized(source, out, "int8") > 0
    return source, out


def _packs(model: torch.nn.Module) -> dict[str, object]:
    return {name: m.packed for name, m in model.named_modules() if isinstance(m, LinearBase)}


def test_convert_stores_quantized_weights_under_the_mode_name(converted: tuple[Path, Path]) -> None:
    _, out = converted
    assert (out / f"rank0.packed-{cache_name('int8', OPS)}.safetensors").is_file()
    assert not (out / f"rank0.packed-{cache_name('int4', OPS)}.safetensors").exists()


def test_a_load_with_the_same_mode_restores_them_without_quantizing(converted: tuple[Path, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    source, out = converted
    fresh, _ = load_model(source, torch.float32, torch.device("cpu"), OPS, quantize="int8")

    def refuse(*args: object) -> None:
        raise AssertionError("quantized again although the conversion holds the weights")

    monkeypatch.setattr(loader_module, "quantize_model", refuse)
    restored, _ = load_model(out, torch.float32, torch.device("cpu"), OPS, quantize="int8")
    want, got = _packs(fresh), _packs(restored)
    assert set(want) == set(got) and all(isinstance(p, QuantLinear) for p in got.values())
    for name, p in got.items():
        assert isinstance(p, QuantLinear)
        w = want[name]
        assert isinstance(w, QuantLinear) and (p.layout, p.group, p.gate_up) == (w.layout, w.group, w.gate_up)
        assert torch.equal(p.data, w.data) and torch.equal(p.scales, w.scales)


def test_another_mode_does_not_take_them(converted: tuple[Path, Path]) -> None:
    _, out = converted
    model, _ = load_model(out, torch.float32, torch.device("cpu"), OPS, quantize="int4")
    packs = _packs(model)
    four_bit = "q4v" if "q4v" in dot_layouts(OPS) else "q4"
    assert {p.layout for name, p in packs.items() if name != "lm_head"} == {four_bit}  # type: ignore[union-attr]
    plain, _ = load_model(out, torch.float32, torch.device("cpu"), OPS)
    assert not any(isinstance(p, QuantLinear) for p in _packs(plain).values())


def test_weights_packed_with_other_int8_groups_are_quantized_again(converted: tuple[Path, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The own groupings are part of the cache name: a build whose ``INT8_GROUPS`` differ from the one
    that filled the cache quantizes with its own instead of serving the old ones."""
    _, out = converted
    stored, stored_int4 = cache_name("int8", OPS), cache_name("int4", OPS)
    monkeypatch.setattr(quant_module, "INT8_GROUPS", (32,))
    assert cache_name("int8", OPS) != stored
    assert cache_name("int4", OPS) != stored_int4  # its LM head is int8
    model, _ = load_model(out, torch.float32, torch.device("cpu"), OPS, quantize="int8")
    groups = {p.group for p in _packs(model).values() if isinstance(p, QuantLinear)}
    assert groups == {32}
