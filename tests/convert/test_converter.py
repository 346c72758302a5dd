"""The pre-sharded cache: what it holds, when it is used, and that it never half-exists."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.convert import conversion_pays, convert, ensure_converted
from lmserve.convert import converter as converter_module
from lmserve.convert.cli import add_convert_parser
from lmserve.errors import UnsupportedModelError
from lmserve.models import loader as loader_module
from lmserve.models.config import build_model_config, read_hf_config
from lmserve.models.registry import resolve_architecture
from lmserve.models.weights import load_weights
from lmserve.parallel import presharded
from lmserve.parallel.state import ParallelState
from tests.parallel.helpers import close
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("private_cache")

FAMILIES = ["llama-gqa-9x3", "gpt2", "gptj", "gpt_neox", "opt-proj-postln", "bloom"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    out = {}
    for family in FAMILIES:
        out[family] = tmp_path_factory.mktemp(family)
        make_tiny_model(out[family], family, tokenizer_dir)
    return out


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A checkpoint of its own, for tests that change or convert it."""
    make_tiny_model(tmp_path / "gpt2", "gpt2", tokenizer_dir)
    return tmp_path / "gpt2"


def _live(model_dir: Path, dtype: torch.dtype, state: ParallelState) -> torch.nn.Module:
    hf = read_hf_config(model_dir)
    arch, cls = resolve_architecture(hf["architectures"])
    model = cls(build_model_config(model_dir, arch, hf, dtype, torch.device("cpu"), None), state)
    load_weights(model, model_dir, cls.weights)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_files_hold_exactly_the_live_sharded_tensors(checkpoints: dict[str, Path], tmp_path: Path,
                                                          family: str) -> None:
    out = convert(checkpoints[family], tmp_path / "tp2", 2, "bf16", progress=False)
    for rank in range(2):
        live = _live(checkpoints[family], torch.bfloat16, ParallelState(rank, 2))
        fresh = _live(checkpoints[family], torch.bfloat16, ParallelState(rank, 2))
        for p in fresh.parameters():
            p.data.zero_()
        presharded.load_rank(fresh, out, rank)
        want, got = dict(presharded.named_tensors(live)), dict(presharded.named_tensors(fresh))
        assert want.keys() == got.keys()
        for name in want:
            assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), name


def test_manifest_describes_source_degree_and_dtype(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    source = checkpoints["bloom"]
    out = convert(source, tmp_path / "c", 2, "fp16", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensor_parallel_degree"] == 2 and manifest["dtype"] == "fp16"
    assert manifest["architecture"] == "BloomForCausalLM"
    assert manifest["fingerprint"] == presharded.fingerprint(source)
    assert {f["name"] for f in manifest["source"]["files"]} == {"config.json", "model.safetensors"}
    assert [r["file"] for r in manifest["ranks"]] == ["rank0.safetensors", "rank1.safetensors"]
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".*tmp*"))


def test_loading_uses_the_cached_conversion_and_converts_once(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny random model mostly repeats its input: the chosen tokens' log-probabilities are what
    # tells a wrongly loaded conversion apart.
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=0)
    (unconverted,) = LLM(str(model_dir), dtype="fp32", kv_cache_tokens=256).generate([[5, 6, 7]], params)
    entry = ensure_converted(model_dir, 2, "fp32", progress=False)
    assert presharded.find_conversion(model_dir, 2, torch.float32) == entry

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(converter_module, "convert", no_conversion)
    assert ensure_converted(model_dir, 2, "fp32", progress=False) == entry  # a cache hit

    def no_live_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded from the original checkpoint")

    monkeypatch.setattr(loader_module, "load_weights", no_live_loading)
    llm = LLM(str(model_dir), dtype="fp32", kv_cache_tokens=256, tensor_parallel_degree=2)
    try:
        (out,) = llm.generate([[5, 6, 7]], params)
    finally:
        close(llm)
    assert out.token_ids == unconverted.token_ids
    assert out.logprobs is not None and unconverted.logprobs is not None
    assert [p.logprob for p in out.logprobs] == pytest.approx([p.logprob for p in unconverted.logprobs], rel=1e-4)


def test_a_failed_conversion_leaves_nothing_behind(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = presharded.save_rank

    def fail_on_rank1(model: torch.nn.Module, path: Path) -> tuple[int, int]:
        if path.name == "rank1.safetensors":
            raise OSError("disk full")
        return real_save(model, path)

    monkeypatch.setattr(presharded, "save_rank", fail_on_rank1)
    with pytest.raises(OSError, match="disk full"):
        ensure_converted(model_dir, 2, "fp32", progress=False)
    entry = presharded.cache_entry(model_dir, 2, torch.float32)
    assert not entry.exists() and not list(entry.parent.glob(f".{entry.name}.tmp-*"))
    assert presharded.find_conversion(model_dir, 2, torch.float32) is None


_KILLED_MIDWAY = """
import os, signal, sys
from lmserve.parallel import presharded
from lmserve.convert import ensure_converted
real = presharded.save_rank
def save_then_die(model, path):
    out = real(model, path)
    os.kill(os.getpid(), signal.SIGKILL)  # a crash after rank 0's file is complete
presharded.save_rank = save_then_die
ensure_converted(sys.argv[1], 2, "fp32", progress=False)
"""


def test_a_conversion_killed_midway_never_looks_complete(model_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _KILLED_MIDWAY, str(model_dir)], env=dict(os.environ),
                          capture_output=True, timeout=120)
    assert done.returncode == -9
    entry = presharded.cache_entry(model_dir, 2, torch.float32)
    assert list(entry.parent.glob(f".{entry.name}.tmp-*"))  # the half-written directory is still there...
    assert not presharded.is_complete(entry)  # ...but it is not an entry
    assert presharded.find_conversion(model_dir, 2, torch.float32) is None
    assert ensure_converted(model_dir, 2, "fp32", progress=False) == entry  # the next start converts...
    assert not list(entry.parent.glob(f".{entry.name}.tmp-*"))  # ...and clears the leftovers


def test_a_changed_checkpoint_is_converted_again_and_the_old_entry_dropped(model_dir: Path) -> None:
    old = ensure_converted(model_dir, 2, "fp32", progress=False)
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert presharded.find_conversion(model_dir, 2, torch.float32) is None
    new = ensure_converted(model_dir, 2, "fp32", progress=False)
    assert new != old and presharded.is_complete(new) and not old.exists()


def test_conversion_pays_only_when_it_saves_work(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    fp32 = checkpoints["gpt2"]
    assert not conversion_pays(fp32, 1, torch.float32)  # the checkpoint already is what would load
    assert conversion_pays(fp32, 1, torch.bfloat16)  # a cast on every start
    assert conversion_pays(fp32, 2, torch.float32)  # slicing on every start
    assert not conversion_pays(convert(fp32, tmp_path / "c", 2, "fp32", progress=False), 2, torch.float32)


def test_a_converted_directory_serves_directly_and_refuses_other_settings(
        checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers())
    out = tmp_path / "opt-tp2"
    args = parser.parse_args(["convert", str(checkpoints["opt-proj-postln"]), "--tp", "2", "--dtype", "fp32",
                              "-o", str(out), "--quiet"])
    assert args.func(args) == 0
    assert str(out) in capsys.readouterr().out
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    original = LLM(str(checkpoints["opt-proj-postln"]), dtype="fp32", kv_cache_tokens=256).generate(prompts, params)
    llm = LLM(str(out), dtype="fp32", kv_cache_tokens=256, tensor_parallel_degree=2)
    try:
        converted = llm.generate(prompts, params)
    finally:
        close(llm)
    assert [o.token_ids for o in converted] == [o.token_ids for o in original]
    with pytest.raises(UnsupportedModelError, match="converted for tensor_parallel_degree 2 and dtype fp32; "
                                                    "asked for degree 1 and dtype fp32"):
        LLM(str(out), dtype="fp32", kv_cache_tokens=256)


class _PanelOps:
    """Kernels whose packed form is the transposed weight: stands in for the CPU kernels' panels."""

    name = "test-panels"

    def __init__(self) -> None:
        from lmserve.kernels import ReferenceOps

        self.reference, self.packed = ReferenceOps("cpu"), 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.reference, name)

    def pack_linear_weight(self, w: torch.Tensor) -> object:
        from lmserve.kernels import PackedLinear

        self.packed += 1
        return PackedLinear(w.t().contiguous(), w.shape[0], w.shape[1], layout="transposed")

    def linear(self, x: torch.Tensor, w: object, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = x @ w.data.to(x.dtype)  # type: ignore[attr-defined]
        return y if bias is None else y + bias.to(y.dtype)


def test_the_first_load_keeps_packed_weights_and_later_loads_skip_packing(checkpoints: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    from lmserve.models.loader import load_model

    out = convert(checkpoints["gpt2"], tmp_path / "c", 2, "fp32", progress=False)
    x = torch.randn(3, 64)
    results = []
    for attempt in range(2):
        ops = _PanelOps()
        model, _ = load_model(out, torch.float32, torch.device("cpu"), ops, state=ParallelState(1, 2))
        assert ops.packed == (9 if attempt == 0 else 0)  # 4 linear layers x 2 blocks + the LM head
        assert (out / "rank1.packed-test-panels.safetensors").is_file()
        mlp = model.model.layers[0].mlp
        results.append(mlp.c_proj.matmul(mlp.c_fc(x), None))  # rank 1's partial sum, before all-reduce
    assert torch.equal(results[0], results[1])


def test_kept_packed_weights_that_no_longer_fit_the_layers_are_packed_afresh(checkpoints: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lmserve.models.loader import load_model
    from lmserve.parallel.layers import LinearBase

    out = convert(checkpoints["gpt2"], tmp_path / "c", 1, "fp32", progress=False)
    load_model(out, torch.float32, torch.device("cpu"), _PanelOps())
    path = out / "rank0.packed-test-panels.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["packed"]), {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    for fields in meta.values():
        fields["gate_up"] = True  # as if packed for a fused gate|up layer by another version
    save_file(tensors, str(path), metadata={"packed": json.dumps(meta)})
    ops = _PanelOps()
    model, _ = load_model(out, torch.float32, torch.device("cpu"), ops)
    assert ops.packed == 9
    assert all(m.packed is not None and not m.packed.gate_up for m in model.modules() if isinstance(m, LinearBase))
