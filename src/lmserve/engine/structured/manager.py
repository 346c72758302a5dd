"""Per-request grammar matchers: compiled off the step loop, masked in one batch, advanced per token.

One ``StructuredOutputManager`` per engine (so per model). The tokenizer's llguidance form is built
once, lazily, on the compile thread. Compiled grammars are cached per (kind, spec) in an LRU of
futures, so concurrent requests with one schema compile it once; each request gets a cheap deep
copy of the compiled matcher. A request's matcher is a function of its output tokens alone, which
preemption by recompute keeps: ``_matcher`` checks the count it has consumed against the request's
and replays the output if they ever differ, so a rebuilt request can never run on a stale state.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from lmserve.engine.request import Request
from lmserve.engine.structured.bitmask import allocate_bitmask, apply_bitmask
from lmserve.engine.structured.grammar import grammar_text
from lmserve.engine.structured_spec import StructuredOutputs
from lmserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

FIELD = "structured_outputs"


@dataclass
class _State:
    compiled: Future[llguidance.LLMatcher]
    matcher: llguidance.LLMatcher | None = None
    consumed: int = 0  # output tokens the matcher has consumed


class StructuredOutputManager:
    """Grammar state of the engine's constrained requests (used by the engine's thread only, but for
    the compile pool, which touches nothing but the cache of futures)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = 256, compile_threads: int = 2) -> None:
        self._hf_tokenizer, self._vocab_size, self._eos = hf_tokenizer, vocab_size, list(eos_token_ids)
        self._llg_tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[llguidance.LLMatcher]] = OrderedDict()
        self._cache_size = cache_size
        self._pool = ThreadPoolExecutor(compile_threads, thread_name_prefix="grammar-compile")
        self._executor: llguidance.LLExecutor | None = None
        self._states: dict[str, _State] = {}
        self._bitmask = allocate_bitmask(0, vocab_size)

    # -- lifecycle of one request ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Start compiling ``request``'s grammar (or reuse the cached compilation)."""
        spec = request.params.structured
        assert spec is not None
        self._states[request.request_id] = _State(self._compile(spec))

    def is_ready(self, request_id: str) -> bool:
        """Whether the request's grammar is compiled (successfully or not: see ``error``)."""
        return self._states[request_id].compiled.done()

    def error(self, request_id: str) -> InvalidRequestError | None:
        """The compile error of a ready request, if its grammar could not be compiled."""
        exc = self._states[request_id].compiled.exception()
        if exc is None:
            return None
        if isinstance(exc, InvalidRequestError):
            return exc
        return InvalidRequestError(FIELD, f"cannot be compiled: {exc}")

    def wait_any(self, request_ids: Sequence[str], timeout_s: float) -> None:
        """Block until one of these requests' grammars is compiled, at most ``timeout_s``."""
        from concurrent.futures import FIRST_COMPLETED, wait

        wait([self._states[r].compiled for r in request_ids], timeout_s, FIRST_COMPLETED)

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    # -- each step -------------------------------------------------------------------------------
    def apply_masks(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """Disallow, in place, every token the grammar of each constrained row forbids next.

        Costs one check when no request is constrained; otherwise one parallel mask fill and one
        tensor operation for all constrained rows together.
        """
        if not self._states:
            return
        rows = [i for i, r in enumerate(requests) if r.request_id in self._states]
        if not rows:
            return
        if self._bitmask.shape[0] < len(rows):
            self._bitmask = allocate_bitmask(max(len(rows), 2 * self._bitmask.shape[0]), self._vocab_size)
        matchers = [(self._matcher(requests[i]), k) for k, i in enumerate(rows)]
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        words = self._bitmask.shape[1]
        self._executor.unsafe_compute_mask_ptr(matchers, self._bitmask.data_ptr(), words * 4,
                                               self._bitmask.shape[0])
        apply_bitmask(logits, self._bitmask, rows)

    def accept(self, request: Request, token: int) -> bool:
        """Advance ``request``'s matcher past its newest output ``token``; True when its grammar is
        complete (nothing but end-of-sequence may follow). Raises ``InvalidRequestError`` if the
        token breaks the grammar, which the mask prevents unless every token was disallowed."""
        matcher = self._matcher(request, upto=request.num_output_tokens - 1)
        state = self._states[request.request_id]
        if not matcher.consume_token(token):
            raise InvalidRequestError(FIELD, f"the model could not continue the grammar: {matcher.get_error()}")
        state.consumed += 1
        return bool(matcher.is_stopped())

    def _matcher(self, request: Request, upto: int | None = None) -> llguidance.LLMatcher:
        """The request's matcher, having consumed its first ``upto`` output tokens (all by default)."""
        state = self._states[request.request_id]
        upto = request.num_output_tokens if upto is None else upto
        if state.matcher is None:
            state.matcher = state.compiled.result().deep_copy()
        if state.consumed != upto:  # rebuilt (say after preemption): replay from the start
            state.matcher.reset()
            if upto and not state.matcher.consume_tokens(request.output_token_ids[:upto]):
                raise InvalidRequestError(FIELD, f"output no longer matches: {state.matcher.get_error()}")
            state.consumed = upto
        return state.matcher

    # -- compilation -----------------------------------------------------------------------------
    def _compile(self, spec: StructuredOutputs) -> Future[llguidance.LLMatcher]:
        key = (spec.kind, _spec_text(spec))
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        future = self._pool.submit(self._build, spec)
        self._cache[key] = future
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return future

    def _build(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar_text(spec, FIELD), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(FIELD, f"cannot be compiled: {matcher.get_error()}")
        return matcher

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._llg_tokenizer is None:
                import llguidance.hf

                self._llg_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos)
                log.info("structured output: tokenizer prepared (%d tokens)", self._vocab_size)
            return self._llg_tokenizer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _spec_text(spec: StructuredOutputs) -> str:
    if spec.choice is not None:
        return "\x00".join(spec.choice)
    return str(spec.json or spec.regex or spec.grammar or "")


__all__ = ["StructuredOutputManager"]
