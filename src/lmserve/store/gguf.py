"""Import a GGUF file into a Hugging Face-style model directory.

A GGUF bundles weights (often quantized), the model's shape and its tokenizer in one file. The rest
of lmserve reads Hugging Face directories, so we convert once: ``config.json``, ``model.safetensors``
(quantized tensors dequantized to float32, the others kept in their dtype), the tokenizer files and a
``generation_config.json`` that stops at the chat template's end-of-turn token. The raw blocks of the
quantized linear weights are kept too (``gguf_quant.BLOCKS_FILE``), for ``quantize="gguf"``.

The import is atomic: it is built in a hidden directory beside ``out_dir`` and renamed into place,
with ``lmserve_import.json`` (the source's fingerprint) written last. A directory at ``out_dir``
therefore is always complete, and one holding the same fingerprint is reused without work.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmserve.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from lmserve.fsutil import staged_dir
from lmserve.store.gguf_quant import BLOCKS_FILE, keep_blocks, to_grouped, write_blocks
from lmserve.store.gguf_rope import plain_number as _plain_number
from lmserve.store.gguf_rope import rope_scaling

IMPORT_RECORD = "lmserve_import.json"
# Imports before the quantized blocks were kept lack them: a different value re-imports once.
BLOCKS_FORMAT = 1
_MIB = 1 << 20


@dataclass(frozen=True)
class _Architecture:
    """How one GGUF ``general.architecture`` maps onto a transformers model class."""

    hf_class: str
    model_type: str
    # llama.cpp interleaves the rows of q and k of llama-arch models for its rotary layout.
    permuted_qk: bool


ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": _Architecture("Qwen2ForCausalLM", "qwen2", permuted_qk=False),
}

# GGUF tensor name (without ".weight"/".bias") -> Hugging Face module name.
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Tensors that carry data for config.json rather than weights.
_CONFIG_TENSORS = {"rope_freqs.weight"}

# "<arch>.<key>" metadata -> config.json field; a None default means the key is required.
_CONFIG_KEYS: dict[str, tuple[str, Any]] = {
    "embedding_length": ("hidden_size", None),
    "feed_forward_length": ("intermediate_size", None),
    "block_count": ("num_hidden_layers", None),
    "attention.head_count": ("num_attention_heads", None),
    "attention.layer_norm_rms_epsilon": ("rms_norm_eps", None),
    "context_length": ("max_position_embeddings", None),
    "rope.freq_base": ("rope_theta", 10000.0),  # llama.cpp's own default when the key is absent
}
_TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}

# Tokens chat templates close a turn with; generation must stop there, not only at the file's eos.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


def import_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Convert ``gguf_path`` into a Hugging Face model directory at ``out_dir`` and return ``out_dir``.

    Returns at once when ``out_dir`` already holds an import of the same file (by fingerprint). An
    earlier import of another file is replaced; any other non-empty ``out_dir`` is refused.

    Raises:
        ModelNotFoundError: ``gguf_path`` does not exist.
        UnsupportedModelError: not a GGUF, or an architecture, tensor or quantization we cannot convert.
        ConfigError: ``out_dir`` holds something that is not an lmserve import.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    record = _import_record_for(gguf_path)
    if _holds_import(out_dir, record):
        return out_dir
    _check_replaceable(out_dir)
    reader = _open_reader(gguf_path)
    # An earlier import is swapped out whole; a concurrent import of the same file may win the rename.
    with staged_dir(out_dir, replace=True, already_done=lambda: _holds_import(out_dir, record)) as staging:
        _build(reader, gguf_path, staging, progress)
        (staging / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _apply_umask(staging)
    return out_dir


def import_record(model_dir: Path) -> dict[str, Any] | None:
    """The ``lmserve_import.json`` of a finished import in ``model_dir``, or None if there is none."""
    try:
        record = json.loads((Path(model_dir) / IMPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def gguf_fingerprint(gguf_path: Path) -> dict[str, Any]:
    """A cheap identity of a file: its size and a sha256 over its first and last MiB and the size."""
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with gguf_path.open("rb") as f:
        digest.update(f.read(_MIB))
        f.seek(max(0, size - _MIB))
        digest.update(f.read(_MIB))
    return {"size": size, "sha256": digest.hexdigest()}


def _import_record_for(gguf_path: Path) -> dict[str, Any]:
    from lmserve._version import __version__

    return {"source": gguf_path.name, **gguf_fingerprint(gguf_path), "lmserve_version": __version__,
            "blocks_format": BLOCKS_FORMAT}


def _holds_import(out_dir: Path, record: dict[str, Any]) -> bool:
    existing = import_record(out_dir)
    return existing is not None and all(existing.get(k) == record[k] for k in ("size", "sha256", "blocks_format"))


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but nothing, an empty directory, or an earlier import."""
    if not out_dir.exists() or (out_dir.is_dir() and (import_record(out_dir) or not any(out_dir.iterdir()))):
        return
    raise ConfigError("out_dir", str(out_dir), "a missing or empty directory, or an earlier lmserve import")


def _apply_umask(directory: Path) -> None:
    """safetensors creates owner-only files; give the import the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _open_reader(gguf_path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as exc:
        raise UnsupportedModelError(f"{gguf_path.name} is not a readable GGUF file: {exc}") from exc


def _build(reader: Any, gguf_path: Path, out: Path, progress: bool) -> None:
    """Write every file of the import except the import record into ``out``."""
    meta = _read_metadata(reader)
    arch = _architecture(meta)
    config = _model_config(meta, arch, reader)
    _write_weights(reader, config, arch, out / "model.safetensors", progress)
    _write_json(out / "config.json", config)
    _write_tokenizer(gguf_path, meta, out)
    _write_json(out / "generation_config.json", _generation_config(meta))


def _read_metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata, plus the token list; other arrays (scores, merges) are skipped."""
    from gguf import GGUFValueType

    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        is_array = field.types and field.types[0] == GGUFValueType.ARRAY
        if not is_array or key == "tokenizer.ggml.tokens":
            meta[key] = field.contents()
    return meta


def _architecture(meta: dict[str, Any]) -> _Architecture:
    name = meta.get("general.architecture")
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {name!r} is not supported; supported architectures: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _model_config(meta: dict[str, Any], arch: _Architecture, reader: Any) -> dict[str, Any]:
    """config.json for the model this GGUF holds."""
    arch_name = meta["general.architecture"]
    config: dict[str, Any] = {"architectures": [arch.hf_class], "model_type": arch.model_type}
    config.update(_shape_config(meta, arch_name))
    config.update(_tensor_config(reader))
    config.update(_special_token_ids(meta))
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    scaling = rope_scaling(meta, arch_name, config, rope_freqs)
    if scaling:
        config["rope_scaling"] = scaling
    return config


def _shape_config(meta: dict[str, Any], arch_name: str) -> dict[str, Any]:
    """The config fields the ``<arch>.*`` metadata states."""
    config: dict[str, Any] = {}
    for key, (field, default) in _CONFIG_KEYS.items():
        value = meta.get(f"{arch_name}.{key}", default)
        if value is None:
            raise UnsupportedModelError(f"GGUF metadata key '{arch_name}.{key}' is missing; it sets '{field}'")
        config[field] = _plain_number(value)
    heads = config["num_attention_heads"]
    config["num_key_value_heads"] = meta.get(f"{arch_name}.attention.head_count_kv", heads)
    config["head_dim"] = meta.get(f"{arch_name}.attention.key_length", config["hidden_size"] // heads)
    return config


def _tensor_config(reader: Any) -> dict[str, Any]:
    """The config fields the tensor list implies; fails on an unknown tensor before any heavy work."""
    names = {t.name: t for t in reader.tensors}
    for name in names:
        _hf_tensor_name(name)
    if "token_embd.weight" not in names:
        raise UnsupportedModelError("GGUF tensor 'token_embd.weight' is missing; every model needs one")
    return {
        "vocab_size": int(names["token_embd.weight"].shape[-1]),  # GGUF lists shapes innermost first
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp writes no copy of a tied head
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": _torch_dtype_name({t.tensor_type.name for t in reader.tensors}),
    }


def _torch_dtype_name(ggml_types: set[str]) -> str:
    """The dtype the converted weights mostly have: float32 when anything was dequantized."""
    if ggml_types - {"F32", "F16", "BF16"}:
        return "float32"
    return "bfloat16" if "BF16" in ggml_types else "float16" if "F16" in ggml_types else "float32"


def _hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for tensors that only feed config.json."""
    if gguf_name in _CONFIG_TENSORS:
        return None
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    if kind in ("weight", "bias"):
        if len(parts) == 1 and parts[0] in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[parts[0]]}.{kind}"
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
            return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{kind}"
    raise UnsupportedModelError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart; known tensors: "
        f"{', '.join(_GLOBAL_TENSORS)}, blk.N.{{{', '.join(_BLOCK_TENSORS)}}}, each .weight or .bias")


def _write_weights(reader: Any, config: dict[str, Any], arch: _Architecture, path: Path, progress: bool) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    unpermute = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors, blocks = {}, {}
    for tensor in tqdm(reader.tensors, desc="Importing GGUF", unit="tensor", disable=not progress):
        hf_name = _hf_tensor_name(tensor.name)
        if hf_name is None:
            continue
        weight = _to_torch(tensor)
        heads = unpermute.get(tensor.name.split(".")[-2]) if tensor.name.startswith("blk.") else None
        if arch.permuted_qk and heads is not None:
            weight = _unpermute_rotary(weight, heads)
        tensors[hf_name] = weight.contiguous()
        if keep_blocks(tensor):  # rows of blocks: the q/k row interleave is undone the same way
            raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))
            raw = _unpermute_rotary(raw, heads) if arch.permuted_qk and heads is not None else raw
            blocks[hf_name] = (raw, tensor.tensor_type.name, int(weight.shape[-1]))
    save_file(tensors, str(path), metadata={"format": "pt"})
    write_blocks(blocks, path.with_name(BLOCKS_FILE))


def _to_torch(tensor: Any) -> Any:
    """A GGUF tensor as a torch tensor of its Hugging Face shape: float types kept, quantized ones to float32."""
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    kind = tensor.tensor_type
    if kind in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(tensor.data))  # copy out of the read-only memory map
    if kind == Q.BF16:  # read as raw bytes; bfloat16 has no numpy dtype
        return torch.from_numpy(np.array(tensor.data).view(np.uint16)).view(torch.bfloat16)
    if keep_blocks(tensor):  # whole-array arithmetic, equal bit for bit to gguf's row-group loop
        return to_grouped(np.asarray(tensor.data), kind.name, int(tensor.shape[0])).dequantize()
    try:
        return torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, kind), dtype=np.float32))
    except NotImplementedError as exc:
        raise UnsupportedModelError(
            f"GGUF tensor {tensor.name!r} uses quantization {kind.name}, which cannot be dequantized") from exc


def _unpermute_rotary(weight: Any, n_heads: int) -> Any:
    """Undo llama.cpp's row interleave of q/k (per head, rows 2i and 2i+1 came from i and i + dim/2)."""
    shape = weight.shape
    return weight.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _write_tokenizer(gguf_path: Path, meta: dict[str, Any], out: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(f"cannot build a tokenizer from {gguf_path.name}: {exc}") from exc
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 calls the class TokenizersBackend; this name loads in 4.x and 5.x alike.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # where this import happened to load from
        config.pop(key, None)
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(config_path, config)
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    _write_json(out / "special_tokens_map.json", {k: str(v) for k, v in special.items() if v is not None})


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: eos is a list, the file's eos plus the chat template's end of turn."""
    return {**_special_token_ids(meta), "eos_token_id": end_token_ids(meta)}


def _special_token_ids(meta: dict[str, Any]) -> dict[str, int]:
    return {field: meta[f"tokenizer.ggml.{key}"] for field, key in _TOKEN_ID_KEYS.items()
            if f"tokenizer.ggml.{key}" in meta}


def end_token_ids(meta: dict[str, Any]) -> list[int]:
    """The ids generation stops at: GGUF eos and eot ids, and the end-of-turn tokens the template writes."""
    ids = [meta[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if key in meta]
    template = meta.get("tokenizer.chat_template") or ""
    wanted = {token for token in _END_OF_TURN_TOKENS if token in template}
    if wanted:
        ids += [i for i, token in enumerate(meta.get("tokenizer.ggml.tokens", ())) if token in wanted]
    return list(dict.fromkeys(int(i) for i in ids))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
