"""LMI configurations run unchanged: the Neuron example, entry points, rolling batch values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lmserve.config import DEFAULT_ENTRY_POINT, load_serving_config
from lmserve.errors import ConfigError

NEURON_EXAMPLE = """\
engine = Python
option.entryPoint = djl_python.transformers-neuronx
option.batch_size = 4
option.tensor_parallel_degree = 2
option.n_positions = 512
option.dtype = fp16
option.model_loading_timeout = 1500
option.neuron_optimize_level = 2
option.s3url = s3://my-bucket/large-model-lmi/code
"""


def load_props(tmp_path: Path, text: str, model_id: str | None = None, **kw):
    props = tmp_path / "serving.properties"
    props.write_text(text)
    return load_serving_config(model_id, env=kw.pop("env", {}), properties=props, **kw)


def test_neuron_example_lands_in_the_right_fields(tmp_path: Path) -> None:
    config = load_props(tmp_path, NEURON_EXAMPLE)
    assert config.model.model_id == "s3://my-bucket/large-model-lmi/code"
    assert config.model.name == "code"
    assert config.model.entry_point == DEFAULT_ENTRY_POINT
    assert config.model.rolling_batch == "auto"
    assert config.engine.model == "s3://my-bucket/large-model-lmi/code"
    assert config.engine.tensor_parallel_degree == 2
    assert config.engine.max_model_len == 512
    assert config.engine.dtype == "fp16"
    assert config.engine.max_num_seqs == 4  # the static batch size becomes the rolling batch size
    assert config.workers.model_loading_timeout_s == 1500.0
    assert config.warnings == (
        "option.neuron_optimize_level='2' (from "
        f"{tmp_path / 'serving.properties'} line 8) ignored: "
        "only means something on AWS Neuron (Inferentia/Trainium) hardware",
    )


def test_neuron_example_in_the_model_directory_is_found_from_the_positional_argument(tmp_path: Path) -> None:
    (tmp_path / "serving.properties").write_text(NEURON_EXAMPLE)
    config = load_serving_config(str(tmp_path), env={})
    assert config.model.model_id == "s3://my-bucket/large-model-lmi/code"
    assert config.engine.tensor_parallel_degree == 2


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config = load_props(tmp_path, NEURON_EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.engine.dtype = "fp32"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = config.model  # type: ignore[misc]
    assert isinstance(config.warnings, tuple)


@pytest.mark.parametrize(
    "key",
    ["option.compiled_graph_path", "option.context_length_estimate", "option.load_split_model",
     "option.enable_mixed_precision_accumulation", "option.amp", "option.load_in_8bit",
     "option.enable_streaming"],
)  # fmt: skip
def test_hardware_only_keys_leave_exactly_one_warning(key: str, tmp_path: Path) -> None:
    config = load_props(tmp_path, f"{key}=anything\n", "org/m")
    assert len(config.warnings) == 1
    assert config.warnings[0].startswith(f"{key}='anything'") and "ignored" in config.warnings[0]


def test_ignored_key_given_at_two_levels_warns_once(tmp_path: Path) -> None:
    config = load_props(tmp_path, "option.amp=f16\n", "org/m", env={"OPTION_AMP": "bf16"})
    assert len(config.warnings) == 1


@pytest.mark.parametrize("value", ["lmi-dist", "vllm", "scheduler", "trtllm", "deepspeed", "LMI-DIST"])
def test_lmi_rolling_batch_backends_mean_auto_with_one_warning(value: str) -> None:
    config = load_serving_config("org/m", env={"OPTION_ROLLING_BATCH": value})
    assert config.model.rolling_batch == "auto"
    assert len(config.warnings) == 1 and "option.rolling_batch" in config.warnings[0]


def test_rolling_batch_auto_needs_no_warning_and_disable_says_it_is_not_used() -> None:
    assert load_serving_config("org/m", env={"OPTION_ROLLING_BATCH": "auto"}).warnings == ()
    config = load_serving_config("org/m", env={"OPTION_ROLLING_BATCH": "disable"})
    assert config.model.rolling_batch == "disable"
    assert len(config.warnings) == 1 and "not used yet" in config.warnings[0]


def test_static_batch_size_is_the_dynamic_batch_size_without_rolling_batch() -> None:
    env = {"OPTION_ROLLING_BATCH": "disable", "OPTION_BATCH_SIZE": "8"}
    config = load_serving_config("org/m", env=env)
    assert config.batching.batch_size == 8
    assert config.engine.max_num_seqs == 64


def test_explicit_rolling_batch_size_at_the_same_level_beats_static_batch_size(tmp_path: Path) -> None:
    config = load_props(tmp_path, "option.batch_size=4\noption.max_rolling_batch_size=16\n", "org/m")
    assert config.engine.max_num_seqs == 16


def test_static_batch_size_at_a_higher_level_beats_rolling_batch_size(tmp_path: Path) -> None:
    config = load_props(tmp_path, "option.batch_size=4\n", "org/m", env={"MAX_BATCH_SIZE": "16"})
    assert config.engine.max_num_seqs == 4


@pytest.mark.parametrize(
    "entry",
    ["djl_python.transformers_neuronx", "djl_python.transformers-neuronx", "djl_python.huggingface",
     "djl_python.lmi_dist", "djl_python.vllm"],
)  # fmt: skip
def test_lmi_entry_points_map_to_the_default_handler(entry: str) -> None:
    config = load_serving_config("org/m", env={"OPTION_ENTRYPOINT": entry})
    assert config.model.entry_point == DEFAULT_ENTRY_POINT


def test_empty_entry_point_means_the_default_handler() -> None:
    assert load_serving_config("org/m", env={"OPTION_ENTRYPOINT": ""}).model.entry_point == DEFAULT_ENTRY_POINT


@pytest.mark.parametrize("entry", ["model.py", "/opt/ml/model/model.py"])
def test_model_py_entry_point_is_kept_for_the_handler_loader(entry: str) -> None:
    assert load_serving_config("org/m", env={"OPTION_ENTRYPOINT": entry}).model.entry_point == entry


def test_unknown_entry_point_lists_the_accepted_forms() -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_config("org/m", env={"OPTION_ENTRYPOINT": "djl_python.stable_diffusion"})
    message = str(err.value)
    assert "option.entryPoint" in message and "djl_python.stable_diffusion" in message
    assert "env OPTION_ENTRYPOINT" in message
    assert "djl_python.vllm" in message and "model.py" in message


@pytest.mark.parametrize("engine", ["Python", "MPI", "python"])
def test_lmi_engines_are_accepted(engine: str) -> None:
    assert load_serving_config("org/m", env={"SERVING_ENGINE": engine}).warnings == ()


def test_other_djl_engines_are_refused() -> None:
    with pytest.raises(ConfigError, match="engine"):
        load_serving_config("org/m", env={"SERVING_ENGINE": "OnnxRuntime"})
