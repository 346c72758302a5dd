"""Model families, found by the ``architectures`` a checkpoint's config.json declares."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from lmserve.errors import UnsupportedModelError

# architecture name -> "module:Class". Families register here, so adding one touches one line.
_FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "lmserve.models.llama:Qwen2ForCausalLM",
    "GPT2LMHeadModel": "lmserve.models.gpt2:GPT2LMHeadModel",
    "GPTJForCausalLM": "lmserve.models.gptj:GPTJForCausalLM",
    "GPTNeoXForCausalLM": "lmserve.models.gpt_neox:GPTNeoXForCausalLM",
    "OPTForCausalLM": "lmserve.models.opt:OPTForCausalLM",
    "BloomForCausalLM": "lmserve.models.bloom:BloomForCausalLM",
}


def register(architecture: str, target: str) -> None:
    """Map an architecture name to ``"module:Class"`` (for families that live outside lmserve)."""
    _FAMILIES[architecture] = target


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def resolve_architecture(architectures: Sequence[str] | None) -> tuple[str, type[Any]]:
    """The first supported architecture in the list and its model class."""
    for arch in architectures or ():
        target = _FAMILIES.get(arch)
        if target is not None:
            module, _, cls = target.partition(":")
            return arch, getattr(importlib.import_module(module), cls)
    raise UnsupportedModelError(
        f"unsupported model architecture {list(architectures or [])!r}; "
        f"supported: {', '.join(supported_architectures())}")


ModelFactory = Callable[..., Any]
