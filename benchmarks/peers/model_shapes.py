"""Model shapes for the offline benchmark: the default model, or a random-weight model of a larger shape.

A larger shape shows what the GEMM does once prefill dominates; its weights need not be trained, only
the right size, so we write them once (bf16 safetensors, seeded) into the lmserve cache and every
system of the run loads the same Hugging Face directory. Its tokenizer is a word-level table of the
model's vocabulary size: the benchmark sends token ids, the tokenizer only has to exist and agree on
the size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    """How many requests, how long their random prompts, how many tokens each generates."""

    num_requests: int
    min_prompt: int
    max_prompt: int
    new_tokens: int


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama-architecture checkpoint (what ``config.json`` holds)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048

    def num_parameters(self) -> int:
        head_dim = self.hidden_size // self.num_attention_heads
        kv = self.num_key_value_heads * head_dim
        attn = 2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * kv
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size


# TinyLlama-1.1B's published shape.
TINYLLAMA_1_1B = LlamaShape(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                            num_key_value_heads=4, intermediate_size=5632, vocab_size=32000)

# --model-shape -> (shape or None for the default model, the workload the issue measures it with).
MODEL_SHAPES: dict[str, tuple[LlamaShape | None, Workload]] = {
    "default": (None, Workload(num_requests=64, min_prompt=64, max_prompt=512, new_tokens=128)),
    "tinyllama-1.1b": (TINYLLAMA_1_1B, Workload(num_requests=16, min_prompt=128, max_prompt=384, new_tokens=64)),
}


def llama_config(shape: LlamaShape) -> dict[str, object]:
    """``config.json`` of a Llama checkpoint of ``shape`` (bf16, untied embeddings, ids 0-2 special)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def weight_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face Llama checkpoint, by name, with its shape."""
    h, inter = shape.hidden_size, shape.intermediate_size
    kv = shape.num_key_value_heads * (h // shape.num_attention_heads)
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h),
                                         "model.norm.weight": (h,), "lm_head.weight": (shape.vocab_size, h)}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        names.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return names


def random_checkpoint(shape: LlamaShape, out_dir: Path, seed: int = 0) -> Path:
    """Write a random-weight bf16 checkpoint of ``shape`` to ``out_dir`` unless one is there; return it.

    Norm weights are ones and the rest N(0, 0.02), like a freshly initialised model: activations stay
    in range, so every system does the same arithmetic a trained model of this shape would.
    """
    from lmserve.fsutil import staged_dir

    marker = out_dir / "model.safetensors"
    if marker.is_file() and (out_dir / "config.json").is_file():
        return out_dir
    with staged_dir(out_dir, replace=True) as tmp:
        _write_checkpoint(shape, tmp, seed)
    return out_dir


def _write_checkpoint(shape: LlamaShape, out: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, dims in weight_shapes(shape).items():
        if len(dims) == 1:
            tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    _write_tokenizer(shape.vocab_size, out)


def _write_tokenizer(vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    fast.save_pretrained(out)


def model_dir_for(name: str) -> Path:
    """The Hugging Face directory to benchmark for ``--model-shape name``, created on first use."""
    shape, _ = MODEL_SHAPES[name]
    if shape is None:
        from lmserve.store.default_model import pull_default_model

        return pull_default_model()
    from lmserve.cache import cache_subdir

    return random_checkpoint(shape, cache_subdir("bench-models") / f"random-{name}")
