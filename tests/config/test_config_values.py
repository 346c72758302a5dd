"""Values: accepted spellings, and errors that name key, value, source and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.config import load_serving_config
from lmserve.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
     ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False)],
)  # fmt: skip
def test_boolean_spellings(text: str, expected: bool) -> None:
    config = load_serving_config("org/m", env={"OPTION_TRUST_REMOTE_CODE": text})
    assert config.engine.trust_remote_code is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("fp32", "fp32"), ("float32", "fp32"), ("fp16", "fp16"), ("float16", "fp16"),
     ("bf16", "bf16"), ("BFLOAT16", "bf16"), ("auto", "auto")],
)  # fmt: skip
def test_dtype_spellings(text: str, expected: str) -> None:
    assert load_serving_config("org/m", env={"OPTION_DTYPE": text}).engine.dtype == expected


def test_every_typed_field_is_reachable() -> None:
    env = {
        "OPTION_DEVICE": "cpu", "OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS": "2048",
        "OPTION_BLOCK_SIZE": "32", "OPTION_KV_CACHE_TOKENS": "4096",
        "OPTION_GPU_MEMORY_UTILIZATION": "0.5", "OPTION_ENABLE_PREFIX_CACHING": "no",
        "OPTION_CPU_DEVICES": "4", "OPTION_PARALLEL_LOADING": "true", "OPTION_SEED": "7",
        "OPTION_PREDICT_TIMEOUT": "30", "SERVING_MAX_BATCH_DELAY": "5", "SERVING_MAXWORKERS": "3",
        "SERVING_RETRY_THRESHOLD": "0", "SERVING_MAX_REQUEST_BYTES": "1024",
        "SERVING_GRACEFUL_SHUTDOWN_S": "2.5", "SERVING_HOST": "127.0.0.1", "SERVING_SERVED_NAME": "chat",
    }  # fmt: skip
    c = load_serving_config("org/m", env=env)
    assert c.engine.device == "cpu" and c.engine.max_num_batched_tokens == 2048
    assert (c.engine.block_size, c.engine.kv_cache_tokens) == (32, 4096)
    assert c.engine.kv_cache_memory_fraction == 0.5 and c.engine.enable_prefix_caching is False
    assert (c.workers.cpu_devices, c.workers.parallel_loading, c.engine.seed) == (4, True, 7)
    assert c.workers.predict_timeout_s == 30.0 and c.batching.max_batch_delay_ms == 5.0
    assert (c.workers.max_workers, c.workers.retry_threshold) == (3, 0)
    assert (c.server.max_request_bytes, c.server.graceful_shutdown_s) == (1024, 2.5)
    assert c.server.host == "127.0.0.1"
    assert c.model.name == "chat" and c.engine.served_name == "chat"


@pytest.mark.parametrize(
    ("env", "key", "value", "allowed"),
    [
        ({"OPTION_DTYPE": "int8"}, "option.dtype", "int8", "bf16"),
        ({"OPTION_TENSOR_PARALLEL_DEGREE": "0"}, "option.tensor_parallel_degree", "0", "'max'"),
        ({"OPTION_TENSOR_PARALLEL_DEGREE": "two"}, "option.tensor_parallel_degree", "two", ">= 1"),
        ({"OPTION_N_POSITIONS": "-5"}, "option.n_positions", "-5", ">= 1"),
        ({"OPTION_TRUST_REMOTE_CODE": "maybe"}, "option.trust_remote_code", "maybe", "yes/no"),
        ({"OPTION_GPU_MEMORY_UTILIZATION": "1.5"}, "option.gpu_memory_utilization", "1.5", "<= 1"),
        ({"OPTION_DEVICE": "tpu"}, "option.device", "tpu", "cuda"),
        ({"OPTION_ROLLING_BATCH": "sometimes"}, "option.rolling_batch", "sometimes", "disable"),
        ({"SERVING_PORT": "70000"}, "port", "70000", "65535"),
        ({"SERVING_QUEUE_FULL_STATUS": "500"}, "queue_full_status", "500", "429, 503"),
        ({"SERVING_MAX_BATCH_DELAY": "-1"}, "max_batch_delay", "-1", ">= 0"),
        ({"OPTION_PREDICT_TIMEOUT": "0"}, "option.predict_timeout", "0", "> 0"),
        ({"OPTION_PREDICT_TIMEOUT": "inf"}, "option.predict_timeout", "inf", "> 0"),
        ({"OPTION_MAX_ROLLING_BATCH_SIZE": "4.5"}, "option.max_rolling_batch_size", "4.5", "integer"),
        ({"MAX_CONCURRENT_REQUESTS": "lots"}, "job_queue_size", "lots", ">= 1"),
    ],
)
def test_bad_env_values_name_key_value_source_and_allowed(
    env: dict[str, str], key: str, value: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", env=env)
    message = str(err.value)
    (var,) = env
    assert err.value.key == key
    assert repr(value) in message and f"env {var}" in message and allowed in message


def test_bad_properties_value_names_file_and_line(tmp_path: Path) -> None:
    props = tmp_path / "serving.properties"
    props.write_text("option.model_id=org/m\n# comment\noption.max_rolling_batch_size = 0\n")
    with pytest.raises(ConfigError) as err:
        load_serving_config(env={}, properties=props)
    assert err.value.key == "option.max_rolling_batch_size"
    assert f"{props} line 3" in str(err.value) and ">= 1" in str(err.value)


def test_bad_value_through_an_alias_names_the_spelling_used(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", env={"OPTION_MAX_MODEL_LEN": "big"})
    assert err.value.key == "option.max_model_len" and "env OPTION_MAX_MODEL_LEN" in str(err.value)


def test_bad_cli_value_names_the_flag() -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", cli={"port": "http"}, env={})
    assert "CLI --port" in str(err.value)


def test_higher_level_replaces_a_bad_lower_value() -> None:
    config = load_serving_config("org/m", cli={"option.dtype": "fp16"}, env={"OPTION_DTYPE": "int8"})
    assert config.engine.dtype == "fp16"


@pytest.mark.parametrize(
    ("env", "key", "suggestion"),
    [
        ({"OPTION_DTPYE": "fp16"}, "option.dtpye", "OPTION_DTYPE"),
        ({"OPTION_TENSOR_PARALEL_DEGREE": "2"}, "option.tensor_paralel_degree", "OPTION_TENSOR_PARALLEL_DEGREE"),
        ({"SERVING_MIN_WORKERS": "2"}, "min_workers", "SERVING_MINWORKERS"),
        ({"SERVING_PROT": "1"}, "prot", "SERVING_PORT"),
    ],
)
def test_unknown_env_key_names_key_and_suggests_the_closest(env: dict[str, str], key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", env=env)
    assert err.value.key == key
    assert suggestion in str(err.value) and f"env {next(iter(env))}" in str(err.value)


def test_unknown_properties_key_suggests_the_closest(tmp_path: Path) -> None:
    props = tmp_path / "serving.properties"
    props.write_text("option.model_id=org/m\noption.tensor_parallel_degre=2\n")
    with pytest.raises(ConfigError) as err:
        load_serving_config(env={}, properties=props)
    message = str(err.value)
    assert "option.tensor_parallel_degre" in message and "did you mean option.tensor_parallel_degree" in message
    assert "line 2" in message


def test_unknown_key_far_from_any_other_still_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", cli={"zzzzqqq": "1"}, env={})
    assert err.value.key == "zzzzqqq" and "unknown" in str(err.value)


def test_min_workers_above_max_workers_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", env={"SERVING_MINWORKERS": "4", "SERVING_MAXWORKERS": "2"})
    assert err.value.key == "minWorkers" and "maxWorkers" in str(err.value)


def test_protect_inference_needs_an_api_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", env={"SERVING_PROTECT_INFERENCE": "true"})
    assert "SERVING_API_KEY" in str(err.value)
    ok = load_serving_config("org/m", env={"SERVING_PROTECT_INFERENCE": "true", "SERVING_API_KEY": "k"})
    assert ok.server.protect_inference is True


@pytest.mark.parametrize(("text", "expected"), [("JSON", "json"), ("sse", "sse"), ("my_formatter", "my_formatter")])
def test_output_formatter_is_a_built_in_format_or_a_function_name(text: str, expected: str) -> None:
    assert load_serving_config("org/m", env={"OPTION_OUTPUT_FORMATTER": text}).model.output_formatter == expected


def test_an_output_formatter_that_is_no_function_name_is_refused_with_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", env={"OPTION_OUTPUT_FORMATTER": "model.py:fmt"})
    assert err.value.key == "option.output_formatter" and "model.py:fmt" in str(err.value)
    assert "a function defined in the model directory's model.py" in str(err.value)
