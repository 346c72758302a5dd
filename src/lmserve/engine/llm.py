"""The offline entry point: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmserve.config.load import engine_config
from lmserve.config.settings import EngineConfig
from lmserve.config.values import TENSOR_PARALLEL_MAX
from lmserve.engine.outputs import CompletionOutput, RequestDelta
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

Prompt = str | list[int]
Messages = list[dict[str, Any]]


def resolve_model_dir(model: str | Path | None) -> Path:
    """A local model directory for ``model``: the default model when None, else a store lookup."""
    if model is None:
        from lmserve.store.default_model import pull_default_model

        return pull_default_model()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from lmserve.store import resolve_model

    return resolve_model(str(model)).path


class LLM:
    """Load a model once, then generate for batches of prompts, all requests batched continuously.

    ``LLM()`` loads the default model (fetched on first use). Keyword arguments are the fields of
    ``EngineConfig`` (``dtype``, ``device``, ``tensor_parallel_degree``, ``max_model_len``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``kv_cache_tokens``, ``enable_prefix_caching`` ...),
    checked as the serving.properties keys that set them are: a bad or unknown one is a
    ``ConfigError`` naming it, before any model loads; ``None`` means the default.
    """

    def __init__(self, model: str | Path | None = None, **engine_kwargs: Any) -> None:
        checked = engine_config("", engine_kwargs)  # before fetching a model a typo would waste
        self.config = dataclasses.replace(checked, model=str(resolve_model_dir(model)),
                                          tensor_parallel_degree=_degree(checked))
        self.engine = _make_engine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: bool = False) -> list[CompletionOutput]:
        """Generate for every prompt (text or token ids); results come back in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        outputs: dict[str, CompletionOutput] = {}
        order = []
        for prompt, p in zip(prompt_list, param_list, strict=True):
            rid = f"offline-{next(self._ids)}"
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.engine.add_request(rid, token_ids, p)
            outputs[rid] = CompletionOutput(rid, token_ids)
            order.append(rid)
        bar = tqdm(total=len(order), desc="generating", unit=" req", disable=not progress)
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                outputs[delta.request_id].add(delta)
                if delta.finished:
                    bar.update(1)
        bar.close()
        return [outputs[rid] for rid in order]

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None,
             progress: bool = False) -> list[CompletionOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts: list[Prompt] = [self.tokenizer.chat_prompt_ids(conv) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, progress=progress)

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[RequestDelta]:
        """Token deltas of one request as they are made, driving the engine from this event loop.

        Meant for simple scripts; a server runs the engine in its own process instead.
        """
        import asyncio

        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params or SamplingParams())
        try:
            while True:
                done = False
                for delta in self.engine.step():
                    if delta.request_id == rid:
                        yield delta
                        done = delta.finished
                if done:
                    return
                await asyncio.sleep(0)
        finally:
            self.engine.abort_request(rid)


def _degree(config: EngineConfig) -> int:
    """``tensor_parallel_degree="max"`` resolved by the rule of the launcher's
    ``workers.placement.resolve_degree`` (every visible GPU on CUDA, one rank on the CPU), counted
    with torch, which this process has already imported (the launcher's frontend must not)."""
    if config.tensor_parallel_degree != TENSOR_PARALLEL_MAX:
        return config.tensor_parallel_degree
    import torch

    from lmserve.kernels.device import resolve_device

    return max(1, torch.cuda.device_count()) if resolve_device(config.device).type == "cuda" else 1


def _make_engine(config: EngineConfig) -> Any:
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.engine.step_budget import OFFLINE_TARGET_STEP_S

    return LLMEngine(config, target_step_s=OFFLINE_TARGET_STEP_S)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    for i, p in enumerate(items):
        if not isinstance(p, str | list):
            raise InvalidRequestError(f"prompts[{i}]", f"expected a string or a list of token ids, got {type(p).__name__}")
    return items  # type: ignore[return-value]


def _as_param_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError("params", f"got {len(params)} SamplingParams for {n} prompts")
    return params
