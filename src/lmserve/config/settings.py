"""The frozen configuration objects every layer receives.

One function (``lmserve.config.load``) builds a ``ServingConfig`` from CLI flags, environment and
``serving.properties``; the engine takes only an ``EngineConfig``. Field docs name the
``serving.properties`` key each field comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Dtype = Literal["auto", "fp32", "fp16", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
Quantize = Literal["none", "int8", "int4", "gguf"]
QUANTIZE_MODES: tuple[Quantize, ...] = ("none", "int8", "int4", "gguf")


@dataclass(frozen=True)
class EngineConfig:
    """What one engine (one replica, all its tensor-parallel ranks) needs to load and run a model."""

    model: str  # the model as configured; the store replaces it with the fetched local directory
    dtype: Dtype = "auto"  # option.dtype; auto = bf16 where the device runs it well, else fp32
    device: Device = "auto"  # option.device; auto = cuda when available, else cpu
    quantize: Quantize = "none"  # option.quantize: linear weights as int8, int4 or a GGUF's own types
    tensor_parallel_degree: int = 1  # option.tensor_parallel_degree; TENSOR_PARALLEL_MAX until placed
    max_model_len: int | None = None  # option.n_positions; None = the model's own limit
    max_num_seqs: int = 64  # option.max_rolling_batch_size: requests decoded together
    max_num_batched_tokens: int | None = None  # option.max_rolling_batch_prefill_tokens: step budget
    block_size: int = 16  # option.block_size: tokens per KV block
    kv_cache_tokens: int | None = None  # option.kv_cache_tokens; None = sized from free memory
    kv_cache_bytes: int | None = None  # option.kv_cache_bytes; used when kv_cache_tokens is unset
    kv_cache_memory_fraction: float = 0.9  # option.gpu_memory_utilization: vLLM's share of total GPU memory
    enable_prefix_caching: bool = True  # option.enable_prefix_caching
    trust_remote_code: bool = False  # option.trust_remote_code
    enforce_eager: bool = False  # option.enforce_eager: no CUDA graphs for decode steps
    seed: int = 0  # option.seed: the seed of requests that ask for sampling without one
    num_threads: int | None = None  # CPU threads per rank; None = the cores this process may use
    adaptive_threads: bool = True  # option.adaptive_threads: fewer CPU threads while cores are contended
    served_name: str | None = None  # the model's name in API responses; None = the directory name


@dataclass(frozen=True)
class BatchingConfig:
    """Request-level (dynamic) batching, for handlers that are not generative."""

    batch_size: int = 1  # batch_size
    max_batch_delay_ms: float = 100.0  # max_batch_delay


@dataclass(frozen=True)
class WorkerConfig:
    """How many engine replicas run and how they are supervised."""

    min_workers: int | None = None  # minWorkers
    max_workers: int | None = None  # maxWorkers
    gpu_min_workers: int | None = None  # gpu.minWorkers: beats minWorkers when on GPUs
    gpu_max_workers: int | None = None  # gpu.maxWorkers
    cpu_min_workers: int | None = None  # cpu.minWorkers: beats minWorkers when on the CPU
    cpu_max_workers: int | None = None  # cpu.maxWorkers
    cpu_devices: int | None = None  # option.cpu_devices: CPU "devices" to split among replicas
    job_queue_size: int = 1000  # job_queue_size: requests waiting per model before 429
    retry_threshold: int = 10  # retry_threshold: failed restarts before the model is marked failed
    parallel_loading: bool = False  # option.parallel_loading
    model_loading_timeout_s: float = 1800.0  # option.model_loading_timeout
    predict_timeout_s: float = 120.0  # option.predict_timeout
    fail_fast: bool = False  # fail_fast: exit the server when a model given at start fails to load
    heartbeat_timeout_s: float = 10.0  # option.heartbeat_timeout: silence before an engine counts as frozen

    def bounds(self, kind: str) -> tuple[int | None, int | None]:
        """(min, max) replicas on device ``kind`` ("cpu" or "cuda"): the device's own keys
        (gpu.minWorkers, cpu.maxWorkers, ...) beat minWorkers/maxWorkers, as in DJL."""
        low, high = (self.gpu_min_workers, self.gpu_max_workers) if kind == "cuda" else (
            self.cpu_min_workers, self.cpu_max_workers)
        return (low if low is not None else self.min_workers, high if high is not None else self.max_workers)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front door."""

    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 (every interface) is the operator's choice
    port: int = 8080
    api_key: str | None = None  # SERVING_API_KEY: bearer token for the management API
    protect_inference: bool = False  # also require the token on inference routes
    enable_model_api: bool = False  # POST/PUT/DELETE /models without an api key
    allowed_urls: tuple[str, ...] | None = None  # regexes a registered location must match; None: model_store
    model_store: str | None = None  # the operator's model directory; None: <cache>/models
    trust_remote_code_urls: tuple[str, ...] = ()  # registrations that may run their own code
    max_extracted_bytes: int = 256 * 1024**3  # largest total a model archive may extract to
    max_request_bytes: int = 8 * 1024 * 1024
    queue_full_status: int = 429  # 503 for DJL compatibility
    graceful_shutdown_s: float = 30.0


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from and which handler serves it."""

    model_id: str  # option.model_id / option.s3url / CLI argument: dir, archive, s3://, Hub id, GGUF
    name: str  # the model's name in routes and responses
    entry_point: str = "lmserve.default"  # option.entryPoint; LMI entry points map to the default
    rolling_batch: Literal["auto", "disable"] = "auto"  # option.rolling_batch
    task: str | None = None  # option.task: None picks the default handler from the checkpoint
    output_formatter: str | None = None  # option.output_formatter: json, jsonlines, sse or a model.py function
    enable_venv: bool = False  # option.enable_venv: a custom handler's requirements in a model venv
    revision: str | None = None  # option.revision (Hub)
    max_tokens_policy: Literal["error", "clamp"] = "error"  # option.max_tokens_policy
    enable_auto_tool_choice: bool = False  # option.enable_auto_tool_choice
    tool_call_parser: str | None = None  # option.tool_call_parser; None = by model family


@dataclass(frozen=True)
class ServingConfig:
    """Everything ``lmserve serve`` needs, built once at start and never mutated."""

    model: ModelSpec
    engine: EngineConfig
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    warnings: tuple[str, ...] = ()  # one line each: ignored keys, LMI values mapped, keys given twice
