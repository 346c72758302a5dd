"""Configurations written for the managed LMI containers start, and each key keeps its meaning.

Each test starts from a configuration of the kind LMI users write for one engine (vLLM, lmi-dist,
TensorRT-LLM, Neuron, Accelerate), checks that it loads and what each key now means.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.config import DEFAULT_ENTRY_POINT, TENSOR_PARALLEL_MAX, ServingConfig, load_serving_config
from lmserve.errors import ConfigError
from lmserve.workers.placement import Devices, place, replica_count, resolve_degree


def load_props(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ServingConfig:
    props = tmp_path / "serving.properties"
    props.write_text(text)
    return load_serving_config(env=env or {}, properties=props)


def warnings_about(config: ServingConfig, key: str) -> list[str]:
    return [line for line in config.warnings if line.startswith(key + "=")]


# ---- item 1: option.tensor_parallel_degree=max ---------------------------------------------------

LMI_DIST_GUIDE = """\
engine=MPI
option.model_id=meta-llama/Meta-Llama-3-70B-Instruct
option.tensor_parallel_degree=max
option.rolling_batch=lmi-dist
option.max_rolling_batch_size=32
"""


def test_tensor_parallel_max_is_every_gpu_and_places_one_replica_on_eight(tmp_path: Path) -> None:
    config = load_props(tmp_path, LMI_DIST_GUIDE)
    assert config.engine.tensor_parallel_degree == TENSOR_PARALLEL_MAX  # resolved where the devices are known
    gpus = Devices("cuda", 8, tuple(range(32)), tuple(str(i) for i in range(8)))
    degree = resolve_degree(gpus, config.engine.tensor_parallel_degree)
    assert degree == 8
    replicas = replica_count(gpus, degree, config.workers.min_workers, config.workers.max_workers)
    assert replicas == 1
    assert place(gpus, degree, replicas, 0).env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert config.engine.max_num_seqs == 32 and config.model.rolling_batch == "auto"


def test_tensor_parallel_max_is_one_rank_on_the_cpu(tmp_path: Path) -> None:
    config = load_props(tmp_path, LMI_DIST_GUIDE)
    cpu = Devices("cpu", 1, tuple(range(16)))
    assert resolve_degree(cpu, config.engine.tensor_parallel_degree) == 1
    assert place(cpu, 1, 1, 0).num_threads == 16  # the one rank gets every core


def test_tensor_parallel_max_with_cuda_and_no_gpu_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="option.tensor_parallel_degree"):
        resolve_degree(Devices("cuda", 0, (0,), ()), TENSOR_PARALLEL_MAX)


# ---- item 2: LMI's recommended vLLM setup ----------------------------------------------------------

VLLM_ASYNC = """\
option.model_id=Qwen/Qwen2.5-7B-Instruct
option.entryPoint=djl_python.lmi_vllm.vllm_async_service
option.async_mode=true
option.rolling_batch=disable
option.tensor_parallel_degree=max
option.max_model_len=8192
option.max_rolling_batch_size=128
"""


def test_lmi_recommended_vllm_async_setup_serves_the_default_handler(tmp_path: Path) -> None:
    config = load_props(tmp_path, VLLM_ASYNC)
    assert config.model.entry_point == DEFAULT_ENTRY_POINT
    assert config.engine.max_model_len == 8192 and config.engine.max_num_seqs == 128
    [async_mode] = warnings_about(config, "option.async_mode")
    assert "batches requests continuously" in async_mode
    [rolling] = warnings_about(config, "option.rolling_batch")
    assert config.model.rolling_batch == "disable" and "not used yet" in rolling
    assert len(config.warnings) == 2


@pytest.mark.parametrize("entry", ["djl_python.lmi_vllm.vllm_async_service", "djl_python.vllm",
                                   "djl_python.lmi_dist", "djl_python.tensorrt_llm", "djl_python.huggingface"])
def test_engine_entry_points_map_to_the_default_handler(entry: str) -> None:
    config = load_serving_config("org/m", env={"OPTION_ENTRYPOINT": entry, "OPTION_ASYNC_MODE": "true"})
    assert config.model.entry_point == DEFAULT_ENTRY_POINT


# ---- item 3: things lmserve always does, or cannot do --------------------------------------------

VLLM_TUNED = """\
option.model_id=mistralai/Mistral-7B-Instruct-v0.3
option.rolling_batch=vllm
option.paged_attention=true
option.enable_chunked_prefill=true
option.kv_cache_dtype=fp8
option.speculative_config={"model": "ngram", "num_speculative_tokens": 4}
option.pythonExecutable=/opt/djl/vllm_venv/bin/python
option.handler=handle
option.max_rolling_batch_prefill_tokens=4096
"""


def test_always_on_and_unneeded_keys_are_accepted_with_one_warning_each(tmp_path: Path) -> None:
    config = load_props(tmp_path, VLLM_TUNED, env={"SERVING_FAIL_FAST": "true"})
    expected = {"option.paged_attention": "paged KV cache", "option.enable_chunked_prefill": "chunks",
                "option.kv_cache_dtype": "option.dtype", "option.speculative_config": "speculative decoding",
                "option.pythonExecutable": "own Python", "option.handler": "lmserve calls handle()",
                "option.rolling_batch": "continuous batching"}  # fmt: skip
    for key, says in expected.items():
        [line] = warnings_about(config, key)
        assert says in line, line
    assert len(config.warnings) == len(expected)
    assert config.engine.max_num_batched_tokens == 4096
    assert config.workers.fail_fast is True  # mapped, not ignored: the server exits on load failure


@pytest.mark.parametrize("text", ["fail_fast=true\n", "option.fail_fast=true\n"])
def test_fail_fast_in_serving_properties_sets_the_same_field(tmp_path: Path, text: str) -> None:
    config = load_props(tmp_path, "option.model_id=org/m\n" + text)
    assert config.workers.fail_fast is True and config.warnings == ()


def test_fail_fast_is_off_by_default() -> None:
    assert load_serving_config("org/m", env={}).workers.fail_fast is False


# ---- item 4: aliases DJL itself applies ------------------------------------------------------------

TRTLLM = """\
option.model_id=s3://my-bucket/llama-3-8b-trtllm/
option.rolling_batch=trtllm
option.max_num_tokens=16384
option.max_rolling_batch_size=64
max_idle_time=600
gpu.minWorkers=1
gpu.maxWorkers=2
cpu.maxWorkers=4
minWorkers=3
"""


def test_trtllm_aliases_and_device_worker_bounds(tmp_path: Path) -> None:
    config = load_props(tmp_path, TRTLLM)
    assert config.engine.max_num_batched_tokens == 16384
    assert config.workers.bounds("cuda") == (1, 2)  # gpu.* beat minWorkers on GPUs
    assert config.workers.bounds("cpu") == (3, 4)  # minWorkers, and cpu.maxWorkers
    [idle] = warnings_about(config, "max_idle_time")
    assert "keeps replicas up" in idle


def test_vllm_option_env_aliases() -> None:
    env = {"HF_MODEL_ID": "org/m", "OPTION_ENGINE": "Python", "OPTION_MAX_NUM_BATCHED_TOKENS": "8192",
           "OPTION_MAX_DYNAMIC_BATCH_SIZE": "8", "SERVING_GPU_MAXWORKERS": "2"}  # fmt: skip
    config = load_serving_config(env=env)
    assert config.engine.max_num_batched_tokens == 8192
    assert config.batching.batch_size == 8
    assert config.workers.gpu_max_workers == 2
    [dynamic] = warnings_about(config, "option.max_dynamic_batch_size")
    assert "batches continuously" in dynamic


def test_device_bounds_are_checked_against_each_other(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'gpu.minWorkers'.*allowed: <= gpu.maxWorkers \(2\)"):
        load_props(tmp_path, "option.model_id=org/m\ngpu.minWorkers=4\ngpu.maxWorkers=2\n")


# ---- item 5: nothing set is dropped without a word -----------------------------------------------

ACCELERATE = """\
engine=Python
option.model_id=google/flan-t5-xl
option.rolling_batch=disable
option.dtype=fp16
batch_size=4
max_batch_delay=200
"""


def test_dynamic_batching_keys_are_stored_and_say_text_generation_does_not_use_them(tmp_path: Path) -> None:
    config = load_props(tmp_path, ACCELERATE)
    assert (config.batching.batch_size, config.batching.max_batch_delay_ms) == (4, 200.0)
    assert config.engine.dtype == "fp16"
    for key in ("batch_size", "max_batch_delay", "option.rolling_batch"):
        [line] = warnings_about(config, key)
        assert "batches continuously" in line or "batches it continuously" in line


def test_only_the_dynamic_batching_warnings_wait_for_the_model_kind(tmp_path: Path) -> None:
    """The server logs these two only once it knows the model is served by text generation: for a
    handler model (embeddings, model.py) the keys are exactly right, and a warning would mislead."""
    from lmserve.config.keys import for_generation_only

    config = load_props(tmp_path, ACCELERATE)
    waiting = [line for line in config.warnings if for_generation_only(line)]
    assert sorted(line.split("=")[0] for line in waiting) == ["batch_size", "max_batch_delay"]
    [rolling] = warnings_about(config, "option.rolling_batch")
    assert not for_generation_only(rolling)


def test_neuron_static_batch_size_without_rolling_batch_warns_too(tmp_path: Path) -> None:
    config = load_props(tmp_path, "option.model_id=org/m\noption.rolling_batch=disable\noption.batch_size=8\n")
    assert config.batching.batch_size == 8
    [line] = warnings_about(config, "option.batch_size")
    assert "batches continuously" in line


EMBEDDING = """\
option.model_id=BAAI/bge-base-en-v1.5
option.task=text-embedding
option.rolling_batch=disable
"""


def test_embedding_task_picks_the_embedding_handler(tmp_path: Path) -> None:
    config = load_props(tmp_path, EMBEDDING)
    assert config.model.task == "text-embedding"
    assert load_props(tmp_path, EMBEDDING.replace("text-embedding", "feature-extraction")).model.task == "text-embedding"


def test_text_generation_task_is_what_lmserve_does() -> None:
    config = load_serving_config("org/m", env={"OPTION_TASK": "text-generation"})
    assert config.warnings == ()


def test_custom_handler_files_and_functions_are_kept_for_the_handler_loader(tmp_path: Path) -> None:
    for entry in ("model.py", "my_handler.py", "my_package.handlers:handle"):
        assert load_props(tmp_path, f"option.model_id=org/m\noption.entryPoint={entry}\n").model.entry_point == entry
    with pytest.raises(ConfigError) as err:
        load_props(tmp_path, "option.model_id=org/m\noption.entryPoint=not a handler\n")
    assert "option.entryPoint" in str(err.value) and "module:function" in str(err.value)
