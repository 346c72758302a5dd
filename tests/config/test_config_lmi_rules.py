"""LMI configurations: memory meaning, precedence, features not built, and how errors are reported.

Each test starts from a configuration of the kind LMI users write, checks that it loads (or is
refused, all at once and plainly) and what each key now means.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.config import ServingConfig, load_serving_config
from lmserve.errors import ConfigError, ConfigErrors


def load_props(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ServingConfig:
    props = tmp_path / "serving.properties"
    props.write_text(text)
    return load_serving_config(env=env or {}, properties=props)


# ---- item 6: gpu_memory_utilization keeps vLLM's meaning -----------------------------------------

VLLM_MEMORY = """\
option.model_id=meta-llama/Llama-3.1-8B-Instruct
option.rolling_batch=vllm
option.gpu_memory_utilization=0.95
option.max_model_len=16384
"""


def test_gpu_memory_utilization_is_the_engine_share_of_total_memory(tmp_path: Path) -> None:
    config = load_props(tmp_path, VLLM_MEMORY)
    assert config.engine.kv_cache_memory_fraction == 0.95  # sized by engine.kv_cache (tests/engine)
    assert config.engine.max_model_len == 16384
    from lmserve.config import render_keys_markdown

    row = next(line for line in render_keys_markdown().splitlines() if line.startswith("| `option.gpu_memory"))
    assert "total memory" in row and "weights, activations" in row


# ---- item 7: SERVING_* env are server-wide defaults below the model's own configuration ----------

NEURON = """\
option.model_id=s3://my-bucket/llama-2-13b-neuron/
option.entryPoint=djl_python.transformers_neuronx
option.tensor_parallel_degree=8
option.n_positions=4096
option.rolling_batch=auto
option.max_rolling_batch_size=8
"""


def test_serving_env_is_a_default_the_model_file_overrides(tmp_path: Path) -> None:
    env = {"SERVING_OPTION_TENSOR_PARALLEL_DEGREE": "2", "SERVING_OPTION_MAX_ROLLING_BATCH_SIZE": "32",
           "SERVING_OPTION_DTYPE": "bf16", "SERVING_MINWORKERS": "1", "SERVING_PORT": "8081"}  # fmt: skip
    config = load_props(tmp_path, NEURON, env)
    assert config.engine.tensor_parallel_degree == 8  # the model's own file wins
    assert config.engine.max_num_seqs == 8
    assert config.engine.dtype == "bf16"  # the file does not set it: the server-wide default applies
    assert config.workers.min_workers == 1 and config.server.port == 8081


def test_option_env_beats_serving_env_for_the_same_key() -> None:
    env = {"OPTION_DTYPE": "fp16", "SERVING_OPTION_DTYPE": "bf16"}
    assert load_serving_config("org/m", env=env).engine.dtype == "fp16"


def test_configuration_page_states_the_djl_precedence() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert "`serving.properties` > `OPTION_*` env and the shortcut variables > `SERVING_*` env" in page


# ---- item 8: features not built are named, not "unknown" -----------------------------------------

LORA = """\
option.model_id=meta-llama/Llama-3.1-8B-Instruct
option.rolling_batch=vllm
option.enable_lora=true
option.max_loras=4
option.max_lora_rank=64
option.max_cpu_loras=8
"""


def test_lora_deployment_is_refused_as_not_supported_yet(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as err:
        load_props(tmp_path, LORA)
    message = str(err.value)
    assert "LoRA adapters are not supported yet (option.enable_lora='true'" in message
    for key in ("option.max_loras", "option.max_lora_rank", "option.max_cpu_loras"):
        assert f"({key}=" in message
    assert "did you mean" not in message and "unknown" not in message


def test_lora_turned_off_is_accepted(tmp_path: Path) -> None:
    config = load_props(tmp_path, "option.model_id=org/m\noption.enable_lora=false\noption.enable_auto_tool_choice=false\n")
    assert config.warnings == ()


@pytest.mark.parametrize(("line", "feature"), [
    ("option.enable_reasoning=true", "reasoning parsers"),
    ("option.reasoning_parser=deepseek_r1", "reasoning parsers"),
    ('option.limit_mm_per_prompt={"image": 2}', "multimodal inputs"),
    ('option.kv_transfer_config={"kv_connector": "LMCacheConnectorV1"}', "KV-cache transfer"),
])  # fmt: skip
def test_features_not_built_are_named(tmp_path: Path, line: str, feature: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_props(tmp_path, f"option.model_id=org/m\n{line}\n")
    assert f"{feature}" in str(err.value) and "not supported yet" in str(err.value)
    assert line.split("=")[0] in str(err.value)


def test_tool_calling_keys_are_honoured_as_the_managed_containers_name_them(tmp_path: Path) -> None:
    config = load_props(tmp_path, "option.model_id=org/m\noption.enable_auto_tool_choice=true\n"
                                  "option.tool_call_parser=Hermes\n")  # fmt: skip
    assert (config.model.enable_auto_tool_choice, config.model.tool_call_parser) == (True, "hermes")
    assert config.warnings == ()


def test_a_tool_call_parser_lmserve_lacks_is_refused_naming_those_it_has(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_props(tmp_path, "option.model_id=org/m\noption.tool_call_parser=pythonic\n")
    assert "option.tool_call_parser" in str(err.value) and "hermes, llama3_json, mistral" in str(err.value)


# ---- item 9: every unknown key at once; typo hints; a lenient mode -------------------------------

SAMPLE_WITH_TYPOS = """\
engine=Python
option.model_id=TheBloke/Llama-2-7B-fp16
option.tensor_parallel_degree=1
option.max_rolling_batch_prefill_tokes=4096
option.max_rolling_batch_siz=32
option.enable_streamin=true
option.some_future_knob=3
"""


def test_every_unknown_key_of_a_file_is_in_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as err:
        load_props(tmp_path, SAMPLE_WITH_TYPOS)
    errors = {error.key: str(error) for error in err.value.errors}
    assert set(errors) == {"option.max_rolling_batch_prefill_tokes", "option.max_rolling_batch_siz",
                           "option.enable_streamin", "option.some_future_knob"}  # fmt: skip
    assert "did you mean option.max_rolling_batch_prefill_tokens?" in errors["option.max_rolling_batch_prefill_tokes"]
    assert "did you mean option.max_rolling_batch_size?" in errors["option.max_rolling_batch_siz"]
    assert "line 4" in errors["option.max_rolling_batch_prefill_tokes"]
    # option.enable_streaming is only ignored by lmserve: never offered as a fix
    assert "enable_streaming" not in str(err.value)
    assert all(error.key in str(err.value) for error in err.value.errors)


def test_strict_config_false_runs_the_file_with_each_unknown_key_a_warning(tmp_path: Path) -> None:
    config = load_props(tmp_path, SAMPLE_WITH_TYPOS + "option.strict_config=false\n")
    assert config.model.model_id == "TheBloke/Llama-2-7B-fp16"
    typo = next(line for line in config.warnings if line.startswith("option.max_rolling_batch_prefill_tokes="))
    assert "unknown key" in typo and "did you mean option.max_rolling_batch_prefill_tokens?" in typo
    assert len(config.warnings) == 4


def test_strict_config_false_from_the_environment_covers_option_env_typos() -> None:
    env = {"OPTION_STRICT_CONFIG": "false", "OPTION_DTPYE": "fp16", "OPTION_DTYPE": "bf16"}
    config = load_serving_config("org/m", env=env)
    assert config.engine.dtype == "bf16"
    assert any("OPTION_DTYPE" in line and "unknown key" in line for line in config.warnings)


def test_bad_values_and_unknown_keys_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as err:
        load_props(tmp_path, "option.model_id=org/m\noption.dtype=fp64\noption.max_rolling_batch_size=0\noption.x=1\n")
    assert {error.key for error in err.value.errors} == {"option.dtype", "option.max_rolling_batch_size", "option.x"}


@pytest.mark.parametrize(("typo", "hint"), [
    ("option.batch_sise", "option.batch_size"),  # not batch_size, which differs only by the prefix
    ("batch_sise", "batch_size"),
    ("option.gpu_memory_utilisation", "option.gpu_memory_utilization"),
])  # fmt: skip
def test_typo_hint_is_the_key_written_the_same_way(tmp_path: Path, typo: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_props(tmp_path, f"option.model_id=org/m\n{typo}=4\n")
    assert f"did you mean {hint}?" in str(err.value)
