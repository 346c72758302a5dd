"""The contract between an engine and whatever drives it (the offline ``LLM``, the engine process).

The server never touches a model: it drives an object of this shape, in another process, through
typed messages. Tests drive a fake engine of the same shape to exercise the server without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lmserve.engine.outputs import RequestDelta
from lmserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model that frontends need to answer requests and describe the model."""

    name: str
    max_model_len: int  # prompt + generated tokens (``option.n_positions``)
    vocab_size: int
    dtype: str
    device: str
    tensor_parallel_degree: int
    eos_token_ids: tuple[int, ...]
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_tokens: int


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of engine state and counters, for metrics and the management API."""

    num_running: int = 0
    num_waiting: int = 0
    num_preempted_total: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    steps_total: int = 0

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, 0..1."""
        if self.kv_blocks_total == 0:
            return 0.0
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total


class EngineCore(Protocol):
    """A synchronous, single-threaded engine: add requests, call ``step`` until nothing is left."""

    @property
    def model_info(self) -> ModelInfo: ...

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request. Raises ``InvalidRequestError`` (naming the field) if it cannot be served,
        e.g. a prompt that leaves no room for one new token within ``max_model_len``."""

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks. Unknown or finished ids are ignored. The next
        ``step`` reports it with ``finish_reason="abort"``."""

    def step(self) -> list[RequestDelta]:
        """Run one scheduling step and return what it produced, at most one delta per request."""

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> EngineStats: ...
