"""Precedence: CLI > serving.properties > OPTION_* env > SERVING_* env > defaults, and env rules.

As in DJL Serving, SERVING_* variables are server-wide defaults: a model's own configuration
(its serving.properties, its OPTION_* variables) overrides them."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from lmserve.config import TENSOR_PARALLEL_MAX, load_serving_config
from lmserve.errors import ConfigError

# Each level sets option.max_rolling_batch_size (default 64) to its own value.
LEVELS = ("cli", "properties", "option_env", "serving_env")
VALUES = {"cli": 8, "properties": 16, "option_env": 24, "serving_env": 32}


def load_with(levels: tuple[str, ...], tmp_path: Path) -> int:
    env: dict[str, str] = {}
    cli: dict[str, object] = {}
    props = tmp_path / "serving.properties"
    props.write_text("option.model_id=org/model\n")
    if "cli" in levels:
        cli["option.max_rolling_batch_size"] = str(VALUES["cli"])
    if "serving_env" in levels:
        env["SERVING_OPTION_MAX_ROLLING_BATCH_SIZE"] = str(VALUES["serving_env"])
    if "properties" in levels:
        props.write_text(f"option.model_id=org/model\noption.max_rolling_batch_size={VALUES['properties']}\n")
    if "option_env" in levels:
        env["OPTION_MAX_ROLLING_BATCH_SIZE"] = str(VALUES["option_env"])
    config = load_serving_config(cli=cli, env=env, properties=props)
    return config.engine.max_num_seqs


@pytest.mark.parametrize(("higher", "lower"), list(itertools.combinations(LEVELS, 2)))
def test_higher_level_beats_lower_level(higher: str, lower: str, tmp_path: Path) -> None:
    assert load_with((higher, lower), tmp_path) == VALUES[higher]


@pytest.mark.parametrize("level", LEVELS)
def test_any_level_beats_the_default(level: str, tmp_path: Path) -> None:
    assert load_with((level,), tmp_path) == VALUES[level]


def test_default_applies_when_no_level_sets_the_key(tmp_path: Path) -> None:
    assert load_with((), tmp_path) == 64


def test_cli_none_values_override_nothing() -> None:
    config = load_serving_config("m", cli={"option.dtype": None}, env={"OPTION_DTYPE": "bf16"})
    assert config.engine.dtype == "bf16"


@pytest.mark.parametrize(
    ("var", "value", "read"),
    [
        ("HF_MODEL_ID", "org/llama", lambda c: c.model.model_id),
        ("TENSOR_PARALLEL_DEGREE", "4", lambda c: c.engine.tensor_parallel_degree),
        ("MAX_BATCH_SIZE", "12", lambda c: c.engine.max_num_seqs),
        ("MAX_CONCURRENT_REQUESTS", "77", lambda c: c.workers.job_queue_size),
        ("HF_REVISION", "v2", lambda c: c.model.revision),
        ("HF_TRUST_REMOTE_CODE", "true", lambda c: c.engine.trust_remote_code),
    ],
)
def test_shortcut_env_vars(var: str, value: str, read, tmp_path: Path) -> None:
    env = {var: value}
    if var != "HF_MODEL_ID":
        env["HF_MODEL_ID"] = "org/other"
    expected = {"4": 4, "12": 12, "77": 77, "true": True}.get(value, value)
    assert read(load_serving_config(env=env)) == expected


def test_shortcut_loses_to_option_env_and_to_serving_properties(tmp_path: Path) -> None:
    env = {"HF_MODEL_ID": "org/a", "MAX_BATCH_SIZE": "5", "OPTION_MAX_ROLLING_BATCH_SIZE": "6"}
    assert load_serving_config(env=env).engine.max_num_seqs == 6
    props = tmp_path / "serving.properties"
    props.write_text("option.model_id=org/b\n")
    assert load_serving_config(env=env, properties=props).model.model_id == "org/b"


def test_option_env_names_match_keys_in_any_case() -> None:
    env = {"OPTION_ENTRYPOINT": "model.py", "OPTION_S3URL": "s3://b/m", "OPTION_N_POSITIONS": "256"}
    config = load_serving_config(env=env)
    assert config.model.entry_point == "model.py"
    assert config.model.model_id == "s3://b/m"
    assert config.engine.max_model_len == 256


def test_serving_env_reaches_server_model_and_option_keys() -> None:
    env = {
        "SERVING_PORT": "9001",
        "SERVING_API_KEY": "secret",
        "SERVING_BATCH_SIZE": "3",
        "SERVING_MINWORKERS": "2",
        "SERVING_OPTION_DTYPE": "bfloat16",
        "SERVING_QUEUE_FULL_STATUS": "503",
    }
    config = load_serving_config("org/m", env=env)
    assert (config.server.port, config.server.api_key) == (9001, "secret")
    assert config.batching.batch_size == 3
    assert config.workers.min_workers == 2
    assert config.engine.dtype == "bf16"
    assert config.server.queue_full_status == 503


def test_unrelated_env_vars_are_ignored() -> None:
    env = {"PATH": "/bin", "HF_TOKEN": "x", "NEURON_CC_FLAGS": "-O2", "DTYPE": "nonsense", "PORT": "x"}
    config = load_serving_config("org/m", env=env)
    assert config.engine.dtype == "auto" and config.server.port == 8080


def test_djl_launcher_env_vars_warn_instead_of_failing() -> None:
    config = load_serving_config("org/m", env={"SERVING_OPTS": "-Xmx1g"})
    assert any("SERVING_OPTS" in line for line in config.warnings)


def test_canonical_name_beats_alias_in_one_source_with_a_warning(tmp_path: Path) -> None:
    props = tmp_path / "serving.properties"
    props.write_text("option.model_id=org/canonical\noption.s3url=s3://b/alias\n")
    config = load_serving_config(env={}, properties=props)
    assert config.model.model_id == "org/canonical"
    assert any("s3://b/alias" in line for line in config.warnings)


def test_tensor_parallel_max_is_kept_as_the_sentinel() -> None:
    config = load_serving_config("org/m", env={"TENSOR_PARALLEL_DEGREE": "max"})
    assert config.engine.tensor_parallel_degree == TENSOR_PARALLEL_MAX


def test_default_env_is_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTION_DTYPE", "fp16")
    assert load_serving_config("org/m").engine.dtype == "fp16"


def test_server_keys_are_refused_in_serving_properties(tmp_path: Path) -> None:
    props = tmp_path / "serving.properties"
    props.write_text("option.model_id=org/m\nport=9000\n")
    with pytest.raises(ConfigError) as err:
        load_serving_config(env={}, properties=props)
    assert "SERVING_PORT" in str(err.value) and "line 2" in str(err.value)
