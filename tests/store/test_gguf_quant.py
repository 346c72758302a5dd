"""quantize="gguf": a GGUF's quantized tensors are served in their own types, bit for bit.

Synthetic files written with gguf-py's writer: Q8_0/Q4_0/Q4_1 quantized by gguf-py, Q4_K/Q6_K (which
it cannot quantize) built from random bytes with finite fp16 scales, every bit pattern being valid.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmserve.errors import UnsupportedModelError
from lmserve.kernels import ReferenceOps, get_ops
from lmserve.kernels.quant import QuantLinear, dequantize_packed, pack_quant
from lmserve.store.gguf import import_gguf
from lmserve.store.gguf_quant import BLOCKS_FILE, SUPPORTED, read_blocks, to_grouped

from .gguf_fixtures import write_tiny_gguf

Q = gguf.GGMLQuantizationType
_BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}
_FP16_FIELDS = {"Q4_K": [(0, 2), (2, 4)], "Q6_K": [(208, 210)]}


def _raw_blocks(kind: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if kind not in _BLOCK_BYTES:
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), Q[kind])
    size = _BLOCK_BYTES[kind]
    raw = rng.integers(0, 256, (n, k // 256 * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for lo, hi in _FP16_FIELDS[kind]:
        blocks[:, lo:hi] = (rng.standard_normal((blocks.shape[0], 1)) * 0.01).astype(np.float16).view(np.uint8)
    return raw


@pytest.fixture(scope="module")
def one_tensor_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One GGUF per type holding a single [40, 512] weight."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("gguf-types")
    files = {}
    for kind in SUPPORTED:
        writer = gguf.GGUFWriter(str(root / f"{kind}.gguf"), "llama")
        writer.add_tensor("w", _raw_blocks(kind, 40, 512, rng), raw_dtype=Q[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        files[kind] = root / f"{kind}.gguf"
    return files


@pytest.mark.parametrize("ops_kind", ["compiled", "reference"])
@pytest.mark.parametrize("kind", SUPPORTED)
@pytest.mark.parametrize("m", [1, 13])
def test_each_type_multiplies_as_its_dequantized_weight(one_tensor_files: dict[str, Path], kind: str,
                                                        ops_kind: str, m: int) -> None:
    ops = get_ops("cpu") if ops_kind == "compiled" else ReferenceOps("cpu")
    tensor = gguf.GGUFReader(one_tensor_files[kind]).tensors[0]
    want_w = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    g = to_grouped(np.array(tensor.data), kind, 512)
    assert torch.equal(g.dequantize(), want_w)  # the file's own values, not a re-rounding of them
    packed = pack_quant(g)
    assert packed.layout == ("q8" if kind in ("Q8_0", "Q6_K") else "q4")
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
    want = (x.double() @ want_w.double().T).float()
    torch.testing.assert_close(ops.linear(x, packed), want, rtol=1e-4, atol=5e-6 * 512)


# K = 64/128 in the tiny models: the 32-blocks types; Q4_K and Q6_K are covered above.
TINY_TYPES = {
    "token_embd.weight": Q.Q8_0,
    "blk.*.attn_q.weight": Q.Q4_0,
    "blk.*.attn_k.weight": Q.Q4_1,
    "blk.*.attn_v.weight": Q.Q8_0,
    "blk.*.attn_output.weight": Q.Q4_1,
    "blk.*.ffn_gate.weight": Q.Q4_0,
    "blk.*.ffn_up.weight": Q.Q8_0,
    "blk.*.ffn_down.weight": Q.Q4_1,
    "output.weight": Q.Q4_0,
}


@pytest.fixture(scope="module")
def tiny_imports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("gguf-tiny")
    out = {}
    for name, tied in (("llama", False), ("llama-tied", True)):
        tiny = write_tiny_gguf(root / f"{name}.gguf", types=TINY_TYPES, tied=tied)
        out[name] = (tiny, import_gguf(tiny.path, root / name, progress=False))
    return out


@pytest.mark.parametrize("name", ["llama", "llama-tied"])
def test_every_linear_layer_holds_the_files_values(tiny_imports: dict, name: str) -> None:
    from lmserve.models.loader import load_model

    tiny, model_dir = tiny_imports[name]
    model, _ = load_model(model_dir, torch.float32, torch.device("cpu"), ReferenceOps("cpu"), quantize="gguf")
    hf = dict(tiny.model.named_parameters())
    for i in range(2):
        layer = model.model.layers[i]
        p = f"model.layers.{i}."
        expect = {
            layer.self_attn.qkv_proj: torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            layer.self_attn.o_proj: hf[p + "self_attn.o_proj.weight"],
            layer.mlp.gate_up_proj: torch.cat([hf[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up")]),
            layer.mlp.down_proj: hf[p + "mlp.down_proj.weight"],
        }
        for module, want in expect.items():
            assert isinstance(module.packed, QuantLinear)
            torch.testing.assert_close(dequantize_packed(module.packed), want, rtol=0, atol=1e-6)
    head = model.lm_head.packed
    assert isinstance(head, QuantLinear)
    want_head = hf["model.embed_tokens.weight" if name == "llama-tied" else "lm_head.weight"]
    torch.testing.assert_close(dequantize_packed(head)[:want_head.shape[0]], want_head, rtol=0, atol=1e-6)


def test_llm_greedy_matches_the_files_model(tiny_imports: dict) -> None:
    from lmserve.engine.llm import LLM
    from lmserve.engine.sampling_params import SamplingParams

    from ..tiny_models import hf_greedy

    tiny, model_dir = tiny_imports["llama"]
    llm = LLM(model_dir, quantize="gguf", dtype="fp32", max_num_seqs=2)
    prompt = [5, 17, 33, 60, 101, 7]
    out = llm.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0))
    assert list(out[0].token_ids) == hf_greedy(tiny.model, prompt, 8)


def test_a_directory_without_blocks_is_refused_with_the_alternatives(tiny_imports: dict, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="int8.*int4"):
        read_blocks(tmp_path)
    _, model_dir = tiny_imports["llama"]
    assert (model_dir / BLOCKS_FILE).is_file()
