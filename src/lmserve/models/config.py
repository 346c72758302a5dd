"""A checkpoint's config.json, read once into the fields the model code uses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmserve.errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelConfig:
    """The loaded model's shape plus the dtypes it runs in.

    ``dtype`` is how weights and the KV cache are stored; ``act_dtype`` what activations flow in.
    On the CPU activations stay float32 (the kernels compute in float32 whatever the storage).
    """

    path: Path
    architecture: str
    hf: dict[str, Any]
    dtype: torch.dtype
    act_dtype: torch.dtype
    device: torch.device
    max_model_len: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, *names: str, default: Any = None) -> Any:
        """The first of ``names`` present in config.json (families name the same thing differently)."""
        for name in names:
            if self.hf.get(name) is not None:
                return self.hf[name]
        return default


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    config: dict[str, Any] = json.loads(path.read_text())
    if "text_config" in config and "num_hidden_layers" not in config:
        config = {**config["text_config"], "architectures": config.get("architectures")}
    return config


def build_model_config(model_dir: Path, architecture: str, hf: dict[str, Any], dtype: torch.dtype,
                       device: torch.device, max_model_len: int | None) -> ModelConfig:
    """Common fields, with the aliases the supported families use."""

    def pick(*names: str, default: Any = None) -> Any:
        for name in names:
            if hf.get(name) is not None:
                return hf[name]
        if default is None:
            raise UnsupportedModelError(f"config.json lacks {names[0]!r} (also tried {names[1:]})")
        return default

    hidden = int(pick("hidden_size", "n_embd", "d_model"))
    heads = int(pick("num_attention_heads", "n_head", "num_heads"))
    kv_heads = int(pick("num_key_value_heads", "n_head_kv", default=heads))
    head_dim = int(hf.get("head_dim") or hidden // heads)
    native_len = int(pick("max_position_embeddings", "n_positions", "seq_length", default=2048))
    if max_model_len is not None and max_model_len > native_len:
        raise UnsupportedModelError(
            f"n_positions {max_model_len} exceeds the model's maximum of {native_len} positions")
    act = torch.float32 if device.type == "cpu" else dtype
    return ModelConfig(
        path=model_dir, architecture=architecture, hf=hf, dtype=dtype, act_dtype=act, device=device,
        max_model_len=max_model_len or native_len, vocab_size=int(pick("vocab_size")), hidden_size=hidden,
        num_layers=int(pick("num_hidden_layers", "n_layer", "num_layers")), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim)
