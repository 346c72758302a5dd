"""Tiny GGUF files for tests, written the way llama.cpp's converter writes them.

A random-weight transformers model is saved to GGUF with gguf-py: tensor names from gguf-py's own
name map, q/k rows permuted as llama.cpp permutes llama-arch models, some tensors quantized. The
returned ``model`` holds exactly the weights the file holds (each tensor run through the same
quantize/dequantize round trip), so an import can be compared with it to float tolerance.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

Q = gguf.GGMLQuantizationType
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Tensor parallel inference splits the attention heads across devices.",
    "A tokenizer turns text into ids, and ids back into text.",
] * 20

# Mixed storage as real GGUFs have it: quantized matrices, float norms, a half-precision head.
MIXED_TYPES = {
    "token_embd.weight": Q.Q8_0,
    "blk.*.attn_q.weight": Q.Q4_1,
    "blk.*.attn_k.weight": Q.Q4_1,
    "blk.*.attn_v.weight": Q.BF16,
    "blk.*.ffn_*.weight": Q.Q8_0,
    "output.weight": Q.F16,
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@dataclass
class TinyGguf:
    """A written GGUF file and the model and tokenizer it was made from."""

    path: Path
    arch: str
    model: PreTrainedModel  # weights exactly as stored in the file
    float_model: PreTrainedModel  # the weights before quantization
    tokenizer: Tokenizer
    types: dict[str, Any] = field(default_factory=dict)  # GGUF tensor name -> GGMLQuantizationType


def build_tokenizer() -> Tokenizer:
    """A small byte-level BPE tokenizer, trained offline."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer


def write_tiny_gguf(path: Path, arch: str = "llama", types: dict[str, Any] | None = None,
                    tied: bool = False, rope_scaling: dict[str, Any] | None = None, seed: int = 0) -> TinyGguf:
    """Write a 2-layer ``arch`` ("llama" or "qwen2") model to ``path``; ``types`` maps name globs to ggml types."""
    tokenizer = build_tokenizer()
    float_model = _random_model(arch, tokenizer.get_vocab_size(), tied, rope_scaling, seed)
    writer = gguf.GGUFWriter(str(path), arch)
    _add_model_metadata(writer, float_model.config)
    _add_tokenizer_metadata(writer, tokenizer)
    model = _random_model(arch, tokenizer.get_vocab_size(), tied, rope_scaling, seed)
    stored = _add_tensors(writer, float_model, model, arch, types or {})
    if rope_scaling:
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(float_model.config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGguf(path, arch, model.eval(), float_model.eval(), tokenizer, stored)


def write_header_only_gguf(path: Path, arch: str) -> Path:
    """A GGUF of any architecture name with one small tensor, enough to be read."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _random_model(arch: str, vocab_size: int, tied: bool, rope_scaling: dict[str, Any] | None,
                  seed: int) -> PreTrainedModel:
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384 if rope_scaling else 256,
        rms_norm_eps=1e-5, rope_theta=500000.0 if rope_scaling else 10000.0,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,  # the config class edits it in place
        tie_word_embeddings=tied, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 and biases at 0; make both visible in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    return model


def _add_model_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])  # 3: control
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab[EOS_TOKEN])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _add_tensors(writer: gguf.GGUFWriter, float_model: PreTrainedModel, model: PreTrainedModel, arch: str,
                 types: dict[str, Any]) -> dict[str, Any]:
    """Write every weight; set ``model``'s weights to what the file holds. Returns name -> ggml type."""
    config = float_model.config
    names = gguf.get_tensor_name_map({"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch],
                                     config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    stored, params = {}, dict(model.named_parameters())
    for hf_name, tensor in float_model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, _, kind = hf_name.rpartition(".")
        name = f"{names.get_name(module)}.{kind}"
        qtype = next((t for glob, t in types.items() if fnmatch.fnmatchcase(name, glob)), Q.F32)
        data = tensor.numpy()
        with torch.no_grad():
            params[hf_name].copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)))
        n_heads = heads.get(name.split(".")[-2]) if arch == "llama" else None
        if n_heads is not None:
            data = _llama_cpp_permute(data, n_heads)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        stored[name] = qtype
    return stored


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: interleave each head's two rotary halves."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama3_rope_factors(config: Any) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for Llama 3 rope scaling."""

    scaling = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / scaling["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    old, low, high, factor = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                              scaling["high_freq_factor"], scaling["factor"])
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
