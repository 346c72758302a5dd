"""The offline ``LLM``'s keyword arguments are read by the same key table as serving.properties: a
bad one is a ``ConfigError`` naming it, before any model is opened."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM
from lmserve.config.load import engine_config
from lmserve.errors import ConfigError, ConfigErrors, UnknownKeyError


def test_spellings_the_keys_accept_are_accepted_and_none_means_the_default() -> None:
    config = engine_config("m", {"dtype": "float16", "quantize": None, "kv_cache_tokens": None,
                                 "enable_prefix_caching": "false", "max_model_len": "512"})  # fmt: skip
    assert (config.dtype, config.quantize, config.kv_cache_tokens) == ("fp16", "none", None)
    assert config.enable_prefix_caching is False and config.max_model_len == 512
    assert engine_config("m", {"dtype": torch.bfloat16}).dtype == "bf16"


@pytest.mark.parametrize(("options", "field", "allowed"), [
    ({"kv_cache_tokens": -5}, "kv_cache_tokens", "an integer >= 1"),
    ({"max_model_len": "abc"}, "max_model_len", "an integer >= 1"),
    ({"device": "tpu"}, "device", "one of auto, cpu, cuda"),
    ({"quantize": "int3"}, "quantize", "one of none, int8, int4, gguf"),
    ({"tensor_parallel_degree": 0}, "tensor_parallel_degree", "an integer >= 1"),
])  # fmt: skip
def test_a_bad_value_names_the_argument_and_what_it_allows(options: dict, field: str, allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid value for '{field}'") as caught:
        LLM("no/such/model/dir/is/opened", **options)
    assert caught.value.key == field and allowed in caught.value.allowed


def test_a_misspelt_argument_suggests_the_field_and_every_problem_comes_at_once() -> None:
    with pytest.raises(UnknownKeyError, match="'max_modle_len': did you mean 'max_model_len'"):
        engine_config("m", {"max_modle_len": 512})
    with pytest.raises(ConfigErrors) as caught:
        engine_config("m", {"device": "tpu", "block_size": 0, "colour": "red"})
    assert sorted(e.key for e in caught.value.errors) == ["block_size", "colour", "device"]


def test_max_degree_is_one_rank_on_the_cpu_as_the_launcher_resolves_it() -> None:
    from lmserve.engine.llm import _degree

    config = engine_config("m", {"tensor_parallel_degree": "max", "device": "cpu"})
    assert _degree(config) == 1
    assert _degree(engine_config("m", {"tensor_parallel_degree": 2})) == 2
