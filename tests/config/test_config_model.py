"""Which model is served and under what name."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.config import default_model_name, load_serving_config
from lmserve.errors import ConfigError


def test_positional_model_beats_option_model_id_from_every_level(tmp_path: Path) -> None:
    props = tmp_path / "serving.properties"
    props.write_text("option.model_id=org/from-file\n")
    env = {"SERVING_OPTION_MODEL_ID": "org/from-serving-env", "HF_MODEL_ID": "org/from-shortcut"}
    config = load_serving_config("org/positional", env=env, properties=props)
    assert config.model.model_id == "org/positional"


def test_option_model_id_is_used_without_a_positional_argument() -> None:
    assert load_serving_config(env={"OPTION_MODEL_ID": "org/m"}).model.model_id == "org/m"


def test_no_model_anywhere_is_an_error_naming_option_model_id() -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config(env={})
    assert err.value.key == "option.model_id" and "HF_MODEL_ID" in str(err.value)


def test_empty_positional_model_is_an_error() -> None:
    with pytest.raises(ConfigError):
        load_serving_config("  ", env={})


def test_local_directory_is_the_model_when_nothing_names_other_weights(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    (model_dir / "serving.properties").write_text("option.dtype=bf16\n")
    config = load_serving_config(str(model_dir), env={})
    assert config.model.model_id == str(model_dir)
    assert config.model.name == "tiny-llama" and config.engine.dtype == "bf16"


def test_model_directory_serving_properties_can_point_at_remote_weights(tmp_path: Path) -> None:
    (tmp_path / "serving.properties").write_text("option.s3url=s3://bucket/llama-7b/\n")
    config = load_serving_config(str(tmp_path), env={})
    assert config.model.model_id == "s3://bucket/llama-7b/"
    assert config.model.name == "llama-7b"


def test_explicit_properties_path_may_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "serving.properties").write_text("option.model_id=org/m\n")
    assert load_serving_config(env={}, properties=tmp_path).model.model_id == "org/m"


def test_missing_explicit_properties_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", env={}, properties=tmp_path / "missing.properties")
    assert "missing.properties" in str(err.value)


@pytest.mark.parametrize(
    ("model_id", "name"),
    [
        ("meta-llama/Llama-2-7b-hf", "Llama-2-7b-hf"),
        ("s3://bucket/models/llama-7b.tar.gz", "llama-7b"),
        ("s3://bucket/models/llama-7b/", "llama-7b"),
        ("/models/qwen2-0.5b-q4.gguf", "qwen2-0.5b-q4"),
        ("/models/model.tgz", "model"),
        ("gpt2", "gpt2"),
    ],
)
def test_default_model_name_is_the_last_component_without_suffix(model_id: str, name: str) -> None:
    assert default_model_name(model_id) == name
    assert load_serving_config(model_id, env={}).model.name == name


def test_served_name_overrides_the_default() -> None:
    config = load_serving_config("org/m", cli={"served_name": "chat"}, env={})
    assert config.model.name == "chat" and config.engine.served_name == "chat"
