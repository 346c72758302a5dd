"""Which build runs where: the AVX2 build against the reference, the child-process probe that
refuses a build which crashes, and CPUs with no build at all (ARM)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmserve.errors import ConfigError
from lmserve.kernels import ReferenceOps, build, get_ops, machine, ops, reference_attention
from lmserve.kernels import reference as reference_module
from lmserve.kernels.cpu import PanelLinearOps
from lmserve.kernels.device import resolve_dtype
from lmserve.kernels.quant import Grouped

from .paged import make_batch, naive_attention
from .test_attention import BATCHES
from .test_linear import SHAPES, close, expected
from .test_quant import FORMATS, concat, oracle, pack_quant, to_vnni, vnni_oracle
from .test_quant import SHAPES as QUANT_SHAPES
from .test_quant import close as close_quant


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_avx2_linear_matches_fp32_matmul(avx2_ops: PanelLinearOps, m: int, n: int, k: int) -> None:
    torch.manual_seed(m * 7 + n + k)
    w, x = torch.randn(n, k).bfloat16(), torch.randn(m, k)
    close(avx2_ops.linear(x, avx2_ops.pack_linear_weight(w)), expected(x, w), k)


def test_avx2_build_packs_the_reference_panels(avx2_ops: PanelLinearOps) -> None:
    from lmserve.kernels.packed import interleave_gate_up, pack_panels

    w, up = torch.randn(70, 33).bfloat16(), torch.randn(70, 33).bfloat16()
    assert torch.equal(avx2_ops.pack_linear_weight(w).data, pack_panels(w))
    assert torch.equal(avx2_ops.pack_gate_up_weight(w, up).data, pack_panels(interleave_gate_up(w, up)))


@pytest.mark.parametrize("rows", [9, 20])  # 20: 6-row half tiles from 16 rows on
def test_avx2_bias_and_silu_mul(avx2_ops: PanelLinearOps, threads: int, rows: int) -> None:
    torch.manual_seed(threads)
    w, x, bias = torch.randn(70, 576).bfloat16(), torch.randn(rows, 576), torch.randn(70)
    close(avx2_ops.linear(x, avx2_ops.pack_linear_weight(w), bias), expected(x, w) + bias, 576)
    gate, up = torch.randn(100, 576).bfloat16(), torch.randn(100, 576).bfloat16()
    want = torch.nn.functional.silu(expected(x, gate)) * expected(x, up)
    close(avx2_ops.linear_silu_mul(x, avx2_ops.pack_gate_up_weight(gate, up)), want, 576)


def test_avx2_build_runs_argmax_and_swiglu_in_torch(avx2_ops: PanelLinearOps) -> None:
    """What the AVX2 build does not compile; the ops tests run every other op against it."""
    assert not hasattr(avx2_ops.ext, "argmax_rows") and not hasattr(avx2_ops.ext, "silu_and_mul")
    x = torch.randn(4, 64)
    assert torch.equal(avx2_ops.argmax_rows(x), x.argmax(-1))
    torch.testing.assert_close(avx2_ops.silu_and_mul(x), ReferenceOps().silu_and_mul(x))
    assert avx2_ops.name == "cpu-avx2" and avx2_ops.fast_bf16


@pytest.fixture
def no_torch_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized products must come from the build, not from dequantizing in torch."""
    def refuse(*args: object) -> None:
        raise AssertionError("a quantized product fell back to the torch reference")

    monkeypatch.setattr(reference_module, "reference_linear", refuse)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(("m", "n", "k"), QUANT_SHAPES)
@pytest.mark.usefixtures("no_torch_fallback")
def test_avx2_quantized_linear_matches_dequantize_then_matmul(avx2_ops: PanelLinearOps, fmt: str, m: int, n: int,
                                                              k: int) -> None:
    torch.manual_seed(m + n + k)
    g = FORMATS[fmt](torch.randn(n, k))
    x, bias = torch.randn(m, k), torch.randn(n)
    packed = pack_quant(g)
    close_quant(avx2_ops.linear(x, packed), oracle(x, g), k)
    close_quant(avx2_ops.linear(x, packed, bias), oracle(x, g, bias), k)


@pytest.mark.parametrize("fmt", ["int8", "int4+q6k-mixed"])
@pytest.mark.usefixtures("no_torch_fallback")
def test_avx2_quantized_gate_up_at_every_thread_count(avx2_ops: PanelLinearOps, fmt: str, threads: int) -> None:
    torch.manual_seed(threads)
    for m, n, k in [(1, 70, 96), (13, 40, 544), (100, 320, 96)]:
        gate, up = FORMATS[fmt](torch.randn(n, k)), FORMATS[fmt](torch.randn(n, k))
        x = torch.randn(m, k)
        want = torch.nn.functional.silu(oracle(x, gate).double()) * oracle(x, up).double()
        close_quant(avx2_ops.linear_silu_mul(x, pack_quant(concat([gate, up]), n, gate_up=True)), want.float(), k)


def test_avx2_build_packs_for_its_int8_dot_kernels_and_runs_weight_only_layouts_too(avx2_ops: PanelLinearOps) -> None:
    """The AVX2 build asks for both int8-dot layouts (``dot_layouts`` decides the layouts weights are
    packed in), and still multiplies weights packed in the weight-only ones (elsewhere, or with the
    dot kernels switched off) itself."""
    from lmserve.models.quantize import dot_layouts

    assert dot_layouts(avx2_ops) == ("q8v", "q4v")
    torch.manual_seed(3)
    for fmt in ("int8", "int4"):
        g, x = FORMATS[fmt](torch.randn(40, 64)), torch.randn(2, 64)
        close_quant(avx2_ops.linear(x, pack_quant(g)), oracle(x, g), 64)


# M: 1 and 2 (decode, whole and partial 2-row tiles), 13 (an odd last tile) and 150 (several row tasks);
# K: 96 (three groups), 544 (17), 1056 (33, past the kernels' prefetch distance).
@pytest.mark.usefixtures("no_torch_fallback")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 70, 96), (2, 33, 544), (13, 130, 1056), (150, 40, 256)])
def test_avx2_int8_dot_kernels_match_dequantize_then_matmul_of_rounded_activations(
        avx2_ops: PanelLinearOps, threads: int, fmt: str, m: int, n: int, k: int) -> None:
    torch.manual_seed(m + n + threads)
    g, up, x, bias = FORMATS[fmt](torch.randn(n, k)), FORMATS[fmt](torch.randn(n, k)), torch.randn(m, k), torch.randn(n)
    packed = to_vnni(pack_quant(g), avx2_ops.dot_layouts)
    assert packed.layout == {"int8": "q8v", "int4": "q4v"}[fmt]
    close_quant(avx2_ops.linear(x, packed, bias), vnni_oracle(x, g, bias), k)
    gate_up = to_vnni(pack_quant(concat([g, up]), n, gate_up=True), avx2_ops.dot_layouts)
    want = torch.nn.functional.silu(vnni_oracle(x, g).double()) * vnni_oracle(x, up).double()
    close_quant(avx2_ops.linear_silu_mul(x, gate_up), want.float(), k)


@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_avx2_attention_matches_the_oracle(avx2_ops: PanelLinearOps, batch: str, dtype: torch.dtype,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    new, ctx = BATCHES[batch]
    b = make_batch(new, ctx, dtype=dtype, num_heads=9, num_kv_heads=3)
    want = naive_attention(b, 0.125)
    monkeypatch.setattr(reference_attention, "paged_attention", lambda *a: pytest.fail("ran in torch"))
    torch.testing.assert_close(avx2_ops.paged_attention(*b.args(), 0.125), want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("head_dim", [8, 40, 72, 128])
def test_avx2_attention_head_dims_alibi_and_thread_counts(avx2_ops: PanelLinearOps, head_dim: int,
                                                          threads: int) -> None:
    b = make_batch([1, 30, 5], [90, 30, 64], num_heads=8, num_kv_heads=2, head_dim=head_dim, seed=threads)
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(8)])
    for alibi in (None, slopes):
        got = avx2_ops.paged_attention(*b.args(), 0.1, alibi)
        torch.testing.assert_close(got, naive_attention(b, 0.1, alibi), rtol=1e-4, atol=2e-5)


def test_avx2_attention_refuses_bad_metadata(avx2_ops: PanelLinearOps) -> None:
    b = make_batch([1], [40])
    b.block_tables[0, 1] = b.k_cache.shape[0]
    with pytest.raises(ValueError, match="not a block"):
        avx2_ops.paged_attention(*b.args(), 0.1)
    b.block_tables[0, 1] = 0
    b.context_lens[0] = 0
    with pytest.raises(ValueError, match="smaller than"):
        avx2_ops.paged_attention(*b.args(), 0.1)


def test_unknown_isa_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(build.ISA_ENV, "avx9000")
    with pytest.raises(ConfigError, match="avx9000.*avx512, avx2"):
        build.candidate_isas()


def test_a_build_that_crashes_is_refused_and_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv(build.ISA_ENV, "avx2")
    monkeypatch.setattr(build, "isa_unavailable", lambda isa: None)  # the flags say yes
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    monkeypatch.setattr(build, "_probe_command", lambda isa: crash)
    monkeypatch.setattr(build, "_loaded", {})

    def never(isa: build.Isa) -> None:
        raise AssertionError("a build that crashed in the probe must not be loaded")

    monkeypatch.setattr(build, "_compile", never)
    assert build.load_cpu_kernels() is None
    reason = build.probe(build.ISAS["avx2"])
    assert reason is not None and "SIGILL" in reason
    # The verdict is a fact about this machine: the next start does not run the probe again.
    monkeypatch.setattr(build, "_probe_command", lambda isa: [sys.executable, "-c", "pass"])  # would pass now
    assert build.probe(build.ISAS["avx2"]) == reason
    assert list((tmp_path / "kernels").glob("probe-avx2-*.json"))


def test_a_probe_verdict_from_another_machine_is_not_trusted(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path))
    isa = build.ISAS["avx2"]
    # The file this machine's verdict would be read from, holding another key (a copied cache).
    path = machine.probe_path("avx2", machine.machine_key(build=build.build_key(isa), isa="avx2"))
    machine.write_keyed(path, {"cpu_model": "another CPU"}, {"ok": True})
    ran = []
    monkeypatch.setattr(build, "_probe_command", lambda isa: ran.append(1) or [sys.executable, "-c", "exit(3)"])
    reason = build.probe(isa)
    assert ran and reason is not None and "avx2 probe failed" in reason


def test_two_installs_keep_their_probe_verdicts_side_by_side(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two virtual environments or lmserve versions on one machine build different kernels: each
    verdict stays known, so switching between them runs no probe again (nor warns of a foreign file)."""
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path))
    runs = []
    real_run = machine.subprocess.run

    def counting(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        runs.append(command[-1])
        return real_run(command, **kwargs)

    monkeypatch.setattr(machine.subprocess, "run", counting)
    for build_key in ("one", "other", "one", "other"):
        assert machine.probe_verdict("avx2", {"build": build_key}, [sys.executable, "-c", f"# {build_key}"], 60) is None
    assert runs == ["# one", "# other"]


def test_arm_gets_the_torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(build.ENV_SWITCH, raising=False)
    monkeypatch.delenv(build.ISA_ENV, raising=False)
    monkeypatch.setattr(machine.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(build, "cpu_flags", lambda: {"fp", "asimd", "sve", "bf16"})
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(ops, "_by_device_type", {})
    reason = build.disabled_reason()
    assert reason is not None and "x86" in reason
    cpu = get_ops("cpu")
    assert isinstance(cpu, ReferenceOps) and cpu.name == "reference"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    w, x = torch.randn(48, 64).bfloat16(), torch.randn(3, 64)
    close(cpu.linear(x, cpu.pack_linear_weight(w)), expected(x, w), 64)


def test_forcing_avx2_gives_its_ops(avx2_ops: PanelLinearOps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(build.ISA_ENV, "avx2")
    monkeypatch.setattr(ops, "_by_device_type", {})
    chosen = get_ops("cpu")
    assert isinstance(chosen, PanelLinearOps) and chosen.name == "cpu-avx2"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16  # bf16 panels still pay here


@pytest.mark.usefixtures("no_torch_fallback")
def test_avx2_int8_dot_kernel_does_not_saturate_at_the_extremes(avx2_ops: PanelLinearOps) -> None:
    """Weights of -128 and 127 times activations of +-127 (each group's max): the largest pair sums the
    16-bit multiply-add can see, 2 * 128 * 127, must come out exact."""
    n, k = 40, 128
    q = torch.where(torch.rand(n, k) < 0.5, -128, 127).to(torch.int8)
    g = Grouped(q, torch.full((n, k // 32), 0.01), None, 8, 32)
    x = torch.where(torch.rand(3, k) < 0.5, -127.0, 127.0)
    packed = to_vnni(pack_quant(g), avx2_ops.dot_layouts)
    assert packed.layout == "q8v"
    close_quant(avx2_ops.linear(x, packed), oracle(x, g), k)
