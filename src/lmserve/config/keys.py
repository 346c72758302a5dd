"""The one table of configuration keys.

Every key lmserve reads, from ``serving.properties``, the environment or the command line, is a
``Key`` in ``KEYS``: its DJL/LMI name, aliases, value type, the ``ServingConfig`` field it sets, its
CLI flag and environment shortcut. Parsing, validation, error messages, the CLI and the key
reference (``lmserve.config.reference``) are all built from it; nothing else lists keys.

What lmserve does with each key is data here too, so ``lmserve config check`` and the reference
page say it from the same table: a key with a ``field`` is honoured (its aliases map to it, ``notes``
warn about values it accepts but cannot honour fully); an ``ignored`` key is accepted with one
warning line (options of other hardware or engines, or things lmserve always does); a ``refused`` key
names a feature not built yet and is an error unless its value is one of ``accepts``. Any other
unknown key is an error (a warning with ``option.strict_config=false``) that suggests the closest
honoured key; a key lmserve only ignores or refuses is never suggested.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from lmserve.config import values as v
from lmserve.config.settings import QUANTIZE_MODES
from lmserve.dtypes import ALIASES as DTYPE_ALIASES
from lmserve.dtypes import DTYPES

Scope = Literal["model", "server"]


@dataclass(frozen=True)
class Note:
    """A warning for some values of a key: ``values`` (lowercase), or every value when empty."""

    text: str
    values: tuple[str, ...] = ()

    def applies(self, raw: object) -> bool:
        return not self.values or str(raw).strip().lower() in self.values


@dataclass(frozen=True)
class Key:
    """One configuration key and everything lmserve knows about it."""

    name: str  # canonical DJL/LMI spelling, e.g. "option.dtype"
    type: v.ValueType
    field: str | None  # "<section>.<attribute>" of ServingConfig; None: checked, not stored
    doc: str
    aliases: tuple[str, ...] = ()  # other spellings; the canonical name wins when both are given
    flag: str | None = None  # CLI flag of `lmserve serve`; "--no-..." flags set a bool key to false
    shortcut: str | None = None  # environment variable read at the OPTION_* level
    scope: Scope = "model"  # "server" keys come only from SERVING_* env or the CLI, never a model file
    ignored: str | None = None  # why lmserve ignores it: accepted with one warning line
    notes: tuple[Note, ...] = ()  # values accepted but worth one warning line each
    default_text: str | None = None  # for the reference when the field default does not say it
    refused: str | None = None  # a feature not built yet: an error naming it, unless the value accepts
    accepts: tuple[str, ...] = ()  # values (lowercase, as parsed) a refused key may have

    @property
    def honoured(self) -> bool:
        """True when lmserve acts on the key (not only ignores or refuses it)."""
        return self.ignored is None and self.refused is None

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name followed by the aliases, in the order they win within one source."""
        return (self.name, *self.aliases)


# Other LMI engines' formats; named in the error, so a managed-container config fails clearly.
_QUANTIZE_OTHERS = ("; awq, gptq, fp8, bitsandbytes, smoothquant and the other GPU engines' formats "
                    "are not supported")
_NO_DYNAMIC = ("used by handler models (model.py, embeddings, classification) only: text generation batches "
               "continuously and does not use it")


def for_generation_only(warning: str) -> bool:
    """Whether a configuration warning matters only when the model is served by text generation (it
    names a dynamic-batching key), so a handler model's server need not repeat it."""
    return warning.endswith(_NO_DYNAMIC)
_DTYPES = {**{name: name for name in DTYPES}, "auto": "auto", **DTYPE_ALIASES}
_ROLLING = {"auto": "auto", "disable": "disable", **{name: "auto" for name in v.LMI_ROLLING_BATCH}}

_MODEL_KEYS = (
    Key("engine", v.choice({"Python": "Python", "MPI": "MPI", "DeepSpeed": "DeepSpeed"}), None,
        "DJL engine name. lmserve has one engine, so the value is only checked.",
        aliases=("option.engine",), default_text="Python"),
    Key("option.entryPoint", v.ENTRY_POINT, "model.entry_point",
        "Handler: LMI built-in entry points map to the default text-generation handler; a .py file "
        "is a custom handler, as is 'module:function'. A model.py in the model directory is used "
        "when this is absent.", flag="--entry-point"),
    Key("option.task", v.choice(v.TASKS), "model.task",
        "The default handler's task; absent: picked from the checkpoint's architectures "
        "(...ForSequenceClassification: text-classification; encoder-only models such as BertModel: "
        "text-embedding; else text-generation)."),
    Key("option.output_formatter", v.OUTPUT_FORMATTER, "model.output_formatter",
        "Shape of /invocations answers of the text-generation handler: json (one JSON document, "
        "streamed piece by piece when streaming), jsonlines (one JSON line per token, or per input "
        "without streaming), sse (those lines as Server-Sent Events); unset: json, and jsonlines "
        "when streaming. Any other name is a function of the model directory's model.py, called "
        "once per generated token with a TextGenerationOutput (djl_python.output_formatter); the "
        "strings it returns make the answer. It runs in the server process; models registered "
        "through the management API may not name one."),
    Key("option.enable_venv", v.BOOL, "model.enable_venv",
        "Install a custom handler's requirements.txt into a virtual environment of the model's own."),
    Key("option.model_id", v.TEXT, "model.model_id",
        "Model location: local directory, .tar.gz, s3:// prefix, Hub id or GGUF file.",
        aliases=("option.s3url", "option.model_dir"), shortcut="HF_MODEL_ID",
        default_text="required (or the positional model argument)"),
    Key("served_name", v.TEXT, "model.name", "The model's name in routes and API responses.",
        flag="--served-name", default_text="last component of the model id"),
    Key("option.revision", v.TEXT, "model.revision", "Hub revision (branch, tag or commit).",
        shortcut="HF_REVISION"),
    Key("option.rolling_batch", v.choice(_ROLLING), "model.rolling_batch",
        "Continuous batching. LMI backend names all mean auto: lmserve batches itself.",
        notes=(Note("lmserve's own continuous batching is used (auto)", v.LMI_ROLLING_BATCH),
               Note("not used yet for text generation: lmserve batches it continuously (request-level "
                    "batching, which disable selects in LMI, serves handler models only)", ("disable",)))),
    Key("option.max_tokens_policy", v.choice({"error": "error", "clamp": "clamp"}), "model.max_tokens_policy",
        "A request whose max_new_tokens (max_tokens) does not fit beside its prompt in n_positions: "
        "error answers 400 naming both numbers; clamp generates as many tokens as fit. A limit "
        "beyond n_positions is refused either way.", flag="--max-tokens-policy"),
    Key("option.enable_auto_tool_choice", v.BOOL, "model.enable_auto_tool_choice",
        "Let chat requests with tools leave the choice to the model (tool_choice auto, the default "
        "when tools are given): its answer is parsed for tool calls by option.tool_call_parser. "
        "Without it such requests are a 400 saying how to enable it; tool_choice required or a named "
        "function always work (they are enforced by constrained decoding).",
        flag="--enable-auto-tool-choice"),
    Key("option.tool_call_parser", v.choice({name: name for name in v.TOOL_CALL_PARSERS}), "model.tool_call_parser",
        "How the model writes tool calls: hermes (JSON calls inside tool_call tags: Hermes, Qwen), "
        "llama3_json (a JSON object with name and parameters: Llama 3), mistral ([TOOL_CALLS] then a JSON "
        "list); "
        "unset: chosen by the model family (model_type), hermes when the family is unknown.",
        flag="--tool-call-parser", default_text="by model family"),
    Key("option.trust_remote_code", v.BOOL, "engine.trust_remote_code",
        "Allow the startup model's code to run (its tokenizer or model classes in .py files); models "
        "registered through the management API need trust_remote_code_urls instead.",
        flag="--trust-remote-code", shortcut="HF_TRUST_REMOTE_CODE"),
)

_ENGINE_KEYS = (
    Key("option.tensor_parallel_degree", v.TENSOR_PARALLEL, "engine.tensor_parallel_degree",
        "Devices one replica is sharded across. 'max' is resolved at start: every visible GPU on "
        "CUDA; 1 on the CPU (ranks on one host would split the same cores and memory bandwidth).",
        flag="--tensor-parallel-degree", shortcut="TENSOR_PARALLEL_DEGREE"),
    Key("option.dtype", v.choice(_DTYPES), "engine.dtype", "Weight and activation dtype.",
        flag="--dtype"),
    Key("option.quantize", v.choice({mode: mode for mode in QUANTIZE_MODES}, _QUANTIZE_OTHERS), "engine.quantize",
        "Linear weights in fewer bits, in the CPU kernels: int8 (symmetric, one scale per 32 weights) "
        "or int4 (one scale and min per 32) quantizes a float checkpoint at load (and in lmserve "
        "convert); gguf serves a GGUF file's own Q8_0/Q4_0/Q4_1/Q4_K/Q6_K weights as they are (other "
        "types load dequantized). Embeddings and norms stay in option.dtype.", flag="--quantize"),
    Key("option.device", v.choice({"auto": "auto", "cpu": "cpu", "cuda": "cuda"}), "engine.device",
        "Device kind; auto picks cuda when available.", flag="--device"),
    Key("option.n_positions", v.integer(1), "engine.max_model_len",
        "Max prompt + output tokens per request; unset means the model's own limit.",
        aliases=("option.max_model_len", "option.max_tokens"), flag="--n-positions"),
    Key("option.max_rolling_batch_size", v.integer(1), "engine.max_num_seqs",
        "Requests decoded together by one replica.", flag="--max-batch-size",
        shortcut="MAX_BATCH_SIZE"),
    Key("option.max_rolling_batch_prefill_tokens", v.integer(1), "engine.max_num_batched_tokens",
        "Tokens one engine step may process (prefill chunk budget).", flag="--max-batched-tokens",
        aliases=("option.max_num_batched_tokens", "option.max_num_tokens")),
    Key("option.batch_size", v.integer(1), None,
        "Neuron-LMI static batch size: sets option.max_rolling_batch_size when rolling batching, "
        "else batch_size (the key of that field wins when both are given at one level).",
        default_text="unset"),
    Key("option.block_size", v.integer(1), "engine.block_size", "Tokens per KV-cache block.",
        flag="--block-size"),
    Key("option.kv_cache_tokens", v.integer(1), "engine.kv_cache_tokens",
        "KV-cache capacity in tokens; unset sizes it from free memory.", flag="--kv-cache-tokens"),
    Key("option.kv_cache_bytes", v.integer(1), "engine.kv_cache_bytes",
        "KV-cache capacity in bytes (per rank); option.kv_cache_tokens wins when both are set.",
        flag="--kv-cache-bytes"),
    Key("option.gpu_memory_utilization", v.number(0.0, 1.0, low_open=True),
        "engine.kv_cache_memory_fraction",
        "As in vLLM: on CUDA, the share of the GPU's total memory for weights, activations and the "
        "KV cache together; the cache gets what is left of it after the weights and an activation "
        "reserve. On the CPU it scales the cache's cap (a quarter of available memory at 0.9).",
        aliases=("option.kv_cache_free_gpu_mem_fraction",)),
    Key("option.enable_prefix_caching", v.BOOL, "engine.enable_prefix_caching",
        "Share KV blocks of common prompt prefixes.", flag="--no-prefix-caching"),
    Key("option.enforce_eager", v.BOOL, "engine.enforce_eager",
        "On CUDA, run decode steps eagerly instead of replaying the CUDA graphs captured at start "
        "(for batch sizes 1, 2, 4, 8, 16, 24, ... up to option.max_rolling_batch_size).",
        flag="--enforce-eager"),
    Key("option.seed", v.integer(0), "engine.seed", "Seed of sampling requests that give none."),
    Key("option.num_threads", v.integer(1), "engine.num_threads",
        "CPU threads per rank; unset uses the cores this process may use."),
    Key("option.adaptive_threads", v.BOOL, "engine.adaptive_threads",
        "On the CPU, run fewer kernel threads while other processes take part of the cores (measured "
        "each second) and return to option.num_threads when they are free; false keeps the count fixed."),
)

_BATCHING_WORKER_KEYS = (
    Key("batch_size", v.integer(1), "batching.batch_size",
        "Dynamic (request-level) batch size of handler models (model.py, embeddings, classification).",
        flag="--batch-size", notes=(Note(_NO_DYNAMIC),),
        aliases=("max_dynamic_batch_size", "option.max_dynamic_batch_size")),
    Key("max_batch_delay", v.number(0.0), "batching.max_batch_delay_ms",
        "Milliseconds a handler model's dynamic batch waits to fill after its first request.",
        aliases=("option.max_batch_delay",), flag="--max-batch-delay", notes=(Note(_NO_DYNAMIC),)),
    Key("minWorkers", v.integer(1), "workers.min_workers", "Fewest replicas.",
        flag="--min-workers"),
    Key("maxWorkers", v.integer(1), "workers.max_workers", "Most replicas.", flag="--max-workers"),
    *(Key(f"{kind}.{bound}Workers", v.integer(1), f"workers.{kind}_{bound}_workers",
          f"{bound}Workers when the model runs on {label}; beats {bound}Workers there.")
      for kind, label in (("gpu", "GPUs"), ("cpu", "the CPU")) for bound in ("min", "max")),
    Key("option.cpu_devices", v.integer(1), "workers.cpu_devices",
        "CPU 'devices': the cores are split into this many replicas (divided by the tensor-parallel "
        "degree); 1 runs one replica on every core.", flag="--cpu-devices", default_text="1"),
    Key("job_queue_size", v.integer(1), "workers.job_queue_size",
        "Requests waiting per model before the server answers over capacity.",
        flag="--job-queue-size", shortcut="MAX_CONCURRENT_REQUESTS"),
    Key("retry_threshold", v.integer(0), "workers.retry_threshold",
        "Failed restarts before the model is marked failed."),
    Key("option.parallel_loading", v.BOOL, "workers.parallel_loading",
        "Load replicas at the same time."),
    Key("fail_fast", v.BOOL, "workers.fail_fast",
        "Exit the server (status 1) when a model given at start fails to load, so a supervisor "
        "restarts it; false keeps the port up with /ping answering 500.", aliases=("option.fail_fast",),
        flag="--fail-fast"),
    Key("option.model_loading_timeout", v.number(0.0, low_open=True),
        "workers.model_loading_timeout_s", "Seconds a replica may take to load.",
        flag="--model-loading-timeout"),
    Key("option.predict_timeout", v.number(0.0, low_open=True), "workers.predict_timeout_s",
        "Seconds one request may take.", flag="--predict-timeout"),
    Key("option.heartbeat_timeout", v.number(0.0, low_open=True), "workers.heartbeat_timeout_s",
        "Seconds an engine process may stay silent (no heartbeat) before it counts as frozen: its "
        "requests fail with 503 and it is restarted. A long engine step is not silence.",
        flag="--heartbeat-timeout"),
)

_SERVER_KEYS = (
    Key("host", v.TEXT, "server.host",
        "Address to listen on: 127.0.0.1 answers this machine only; 0.0.0.0 every interface (a "
        "container must; see docs/security.md).", flag="--host", scope="server"),
    Key("port", v.integer(0, 65535), "server.port", "Port to listen on.", flag="--port",
        scope="server"),
    Key("api_key", v.TEXT, "server.api_key",
        "Bearer token for the management API, which it turns on (every /models route then needs it).",
        flag="--api-key", scope="server"),
    Key("protect_inference", v.BOOL, "server.protect_inference",
        "Require the api key on inference routes too.", flag="--protect-inference", scope="server"),
    Key("enable_model_api", v.BOOL, "server.enable_model_api",
        "Allow registering, scaling and unregistering models (POST, PUT, DELETE /models) without an "
        "api key: anyone who reaches the port may then load any model allowed_urls allows.",
        flag="--enable-model-api", scope="server"),
    Key("allowed_urls", v.PATTERNS, "server.allowed_urls",
        "Locations POST /models may load: each one it resolves (url, and every option.model_id it "
        "leads to) must fully match one pattern; local paths are matched once made absolute, with "
        "links resolved.", aliases=("model_url_pattern",), flag="--allowed-urls", scope="server",
        default_text="directories and files under model_store only"),
    Key("model_store", v.TEXT, "server.model_store",
        "The operator's model directory: what allowed_urls allows when it is not set.",
        flag="--model-store", scope="server",
        default_text="<cache>/models (cache: $LMSERVE_CACHE, else ~/.cache/lmserve)"),
    Key("trust_remote_code_urls", v.NAMES, "server.trust_remote_code_urls",
        "Locations, exactly as given to POST /models?url= (local paths compared once resolved), "
        "whose registration loads with trust_remote_code; no other registered model may run code "
        "from its files.", flag="--trust-remote-code-urls", scope="server", default_text="none"),
    Key("max_extracted_bytes", v.integer(1), "server.max_extracted_bytes",
        "Largest total a model archive may extract to; checked on the declared sizes before "
        "extracting (with a 100:1 compression-ratio cap past 64 MiB) and while extracting.",
        flag="--max-extracted-bytes", scope="server"),
    Key("max_request_bytes", v.integer(1), "server.max_request_bytes", "Largest request body.",
        aliases=("max_request_size",), scope="server"),
    Key("queue_full_status", v.choice({"429": 429, "503": 503}), "server.queue_full_status",
        "HTTP status when the queue is full (503 for DJL compatibility).", scope="server"),
    Key("graceful_shutdown_s", v.number(0.0), "server.graceful_shutdown_s",
        "Seconds in-flight requests get to finish on shutdown.", scope="server"),
)

_NEURON = "only means something on AWS Neuron (Inferentia/Trainium) hardware"
_QUANT = "lmserve quantizes with option.quantize (none, int8, int4, gguf); weights load as that says"
_OTHER_ENGINE = "an option of another LMI engine (DeepSpeed, HF Accelerate, vLLM, TensorRT-LLM)"
_IGNORED: dict[str, tuple[str, ...]] = {
    _NEURON: ("neuron_optimize_level", "compiled_graph_path", "context_length_estimate",
              "load_split_model", "enable_mixed_precision_accumulation", "enable_saturate_infinity",
              "amp", "unroll", "save_mp_checkpoint_path", "group_query_attention", "model_loader",
              "rolling_batch_strategy", "fuse_qkv", "on_device_embedding", "attention_layout",
              "collectives_layout", "cache_layout", "partition_schema", "all_reduce_dtype",
              "cast_logits_dtype", "draft_model_compiled_path"),
    _QUANT: ("load_in_8bit", "load_in_4bit", "smoothquant_alpha"),
    _OTHER_ENGINE: ("mpi_mode", "low_cpu_mem_usage", "enable_cuda_graph", "triangular_masking",
                    "return_tuple", "training_mp_size", "checkpoint", "device_map",
                    "decoding_strategy", "max_sparsity", "max_splits", "disable_flash_attn",
                    "load_format", "max_input_len", "max_output_len",
                    "use_custom_all_reduce", "tokens_per_block", "batch_scheduler_policy",
                    "max_num_sequences", "enable_trt_overlap", "enable_kv_cache_reuse",
                    "baichuan_model_version", "chatglm_model_version", "multi_block_mode",
                    "use_fused_mlp", "draft_model_id", "speculative_draft_model",
                    "speculative_length", "draft_model_tp_size"),
    "deprecated in LMI; lmserve always streams when a request asks": ("enable_streaming",),
}
IGNORED_KEYS = tuple(
    Key(f"option.{name}", v.ANY, None, reason, ignored=reason)
    for reason, names in _IGNORED.items()
    for name in names
)

# LMI keys for things lmserve always does, cannot do, or does not need: accepted with one warning
# that says what happens instead.
_ALWAYS_IGNORED = (
    Key("option.max_idle_time", v.ANY, None, "", aliases=("max_idle_time",),
        ignored="lmserve keeps replicas up while the model is registered"),
    Key("option.async_mode", v.BOOL, None, "",
        ignored="lmserve batches requests continuously whatever async_mode says"),
    Key("option.paged_attention", v.BOOL, None, "", ignored="lmserve always uses its paged KV cache"),
    Key("option.enable_chunked_prefill", v.BOOL, None, "",
        ignored="lmserve always splits long prompts into chunks of option.max_rolling_batch_prefill_tokens"),
    Key("option.kv_cache_dtype", v.ANY, None, "", ignored="the KV cache is kept in option.dtype"),
    Key("option.speculative_config", v.ANY, None, "",
        ignored="speculative decoding is not built; each step decodes one token per request"),
    Key("option.pythonExecutable", v.ANY, None, "", ignored="lmserve runs in its own Python interpreter"),
    Key("option.handler", v.ANY, None, "",
        ignored="it names the function of model.py to call; lmserve calls handle() (use option.entryPoint="
                "'module:function' to name another)"),
)

# Features not built yet: an error that names the feature, unless the value turns it off.
_LORA = "LoRA adapters are not supported yet"
_PARSERS = "reasoning parsers are not supported yet"
_REFUSED = (
    Key("option.enable_lora", v.BOOL, None, "", refused=_LORA, accepts=("false",)),
    *(Key(f"option.{name}", v.ANY, None, "", refused=_LORA)
      for name in ("max_loras", "max_lora_rank", "max_cpu_loras", "lora_dtype", "fully_sharded_loras")),
    Key("option.enable_reasoning", v.BOOL, None, "", refused=_PARSERS, accepts=("false",)),
    Key("option.reasoning_parser", v.ANY, None, "", refused=_PARSERS),
    Key("option.limit_mm_per_prompt", v.ANY, None, "", refused="multimodal inputs are not supported yet"),
    Key("option.kv_transfer_config", v.ANY, None, "",
        refused="KV-cache transfer between servers (disaggregated prefill) is not supported yet"),
)

_CHECKS = (
    Key("option.strict_config", v.BOOL, None,
        "false turns unknown keys into warnings, for a file you cannot edit (typos then go unnoticed "
        "but for the warning).", default_text="true"),
)

KEYS: tuple[Key, ...] = (
    *_MODEL_KEYS, *_ENGINE_KEYS, *_BATCHING_WORKER_KEYS, *_SERVER_KEYS, *_CHECKS,
    *IGNORED_KEYS, *_ALWAYS_IGNORED, *_REFUSED,
)

# lowercase spelling -> (key, rank); rank 0 is the canonical name, then the aliases in order.
_BY_NAME: dict[str, tuple[Key, int]] = {
    name.lower(): (key, rank) for key in KEYS for rank, name in enumerate(key.names)
}
assert len(_BY_NAME) == sum(len(key.names) for key in KEYS), "two keys share a spelling"


def find_key(name: str) -> tuple[Key, int] | None:
    """The key spelled ``name`` (any case) and the rank of that spelling, or None when unknown."""
    return _BY_NAME.get(name.strip().lower())


def key_by_name(name: str) -> Key:
    """The key whose canonical or alias spelling is ``name``; KeyError for a programming mistake."""
    found = find_key(name)
    if found is None:
        raise KeyError(name)
    return found[0]


# What an unknown key may be taken for: spellings of keys lmserve acts on (never one it only ignores).
HONOURED_NAMES = tuple(name for key in KEYS if key.honoured for name in key.names)


def _bare(name: str) -> str:
    return name.strip().lower().removeprefix("option.")


def closest_key(name: str, candidates: tuple[str, ...] | None = None) -> str | None:
    """The honoured spelling (of ``candidates``, default all) most like ``name`` (difflib), or
    None when nothing is close."""
    pool = candidates if candidates is not None else HONOURED_NAMES
    # Compared without the "option." prefix they share, or every option.* key looks alike; where two
    # keys differ only by it (batch_size, option.batch_size), the one written like ``name`` wins.
    wants_option = name.strip().lower().startswith("option.")
    ordered = sorted(pool, key=lambda spelling: spelling.lower().startswith("option.") == wants_option)
    lowered = {_bare(spelling): spelling for spelling in ordered}
    match = difflib.get_close_matches(_bare(name), list(lowered), n=1, cutoff=0.75)
    if not match:
        return None
    spelling = lowered[match[0]]
    found = find_key(spelling)
    return found[0].names[found[1]] if found else spelling
