"""Tiny random-weight Hugging Face checkpoints for parity tests, built offline in seconds.

Every model shares one small byte-level BPE tokenizer (trained here on a fixed text) with a ChatML
chat template, so detokenization, stop strings and chat paths are exercised for real.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Berlin is the capital of Germany; Madrid the capital of Spain. Café, naïve, smörgåsbord.",
    "Tokens, tokens everywhere: 0123456789 + - * / = ( ) [ ] { } < > ! ? , ; : ' \"",
    "日本語のテキスト、中文文本, emoji 🙂🚀 and accents éèêë àâä ôö ûü ç",
]


def build_tokenizer(out_dir: Path) -> None:
    """Train the shared byte-level BPE tokenizer and save it (with chat template) into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def _llama(**kw: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**kw))


def _mistral(**kw: Any) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**kw))


def _qwen2(**kw: Any) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**kw))


_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)

FAMILIES: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "llama": (_llama, dict(_COMMON, tie_word_embeddings=False, rope_theta=10000.0)),
    "llama-tied-mha": (_llama, dict(_COMMON, num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral": (_mistral, dict(_COMMON, num_key_value_heads=1, sliding_window=None)),
    "qwen2": (_qwen2, dict(_COMMON, tie_word_embeddings=False)),
}


def make_tiny_model(out_dir: Path, family: str, tokenizer_dir: Path, seed: int = 0, **overrides: Any) -> Any:
    """Save a random ``family`` model plus the shared tokenizer in ``out_dir``; returns the HF model."""
    factory, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    kwargs = dict(kwargs, vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=2, pad_token_id=0, **overrides)
    model = factory(**kwargs).eval()
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out_dir)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out_dir / item.name)
    return model


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face's own greedy continuation of ``prompt``, never stopping early."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _hf(config_cls: str, model_cls: str) -> Callable[..., Any]:
    def build(**kw: Any) -> Any:
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))

    return build


_GPT = dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024)
_NEOX = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=1024, rotary_pct=0.25)
_OPT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, max_position_embeddings=1024,
            word_embed_proj_dim=64)

FAMILIES.update({
    # SmolLM's head shape (9 query heads sharing 3 KV heads): degree 2 splits heads unevenly.
    "llama-gqa-9x3": (_llama, dict(_COMMON, hidden_size=72, intermediate_size=144, num_attention_heads=9,
                                   num_key_value_heads=3)),
    "gpt2": (_hf("GPT2Config", "GPT2LMHeadModel"), dict(_GPT)),
    "gptj": (_hf("GPTJConfig", "GPTJForCausalLM"), dict(_GPT, rotary_dim=8)),
    "gpt_neox": (_hf("GPTNeoXConfig", "GPTNeoXForCausalLM"), dict(_NEOX)),
    "gpt_neox-sequential": (_hf("GPTNeoXConfig", "GPTNeoXForCausalLM"), dict(_NEOX, use_parallel_residual=False)),
    "opt": (_hf("OPTConfig", "OPTForCausalLM"), dict(_OPT)),
    "opt-proj-postln": (_hf("OPTConfig", "OPTForCausalLM"), dict(_OPT, word_embed_proj_dim=32,
                                                                  do_layer_norm_before=False)),
    "bloom": (_hf("BloomConfig", "BloomForCausalLM"), dict(hidden_size=64, n_layer=2, n_head=4)),
})
