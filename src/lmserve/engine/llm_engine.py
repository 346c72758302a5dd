"""The engine: one step is schedule, run, sample, update the scheduler, and emit what each request
produced.

A request with a structured-output constraint waits outside the scheduler while its grammar
compiles on the compile pool; each step first admits those whose grammar is ready, so the batch
never waits for a compilation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from lmserve.config.settings import EngineConfig
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.detokenizer import IncrementalDetokenizer
from lmserve.engine.gpu_sampler import make_sampler
from lmserve.engine.outputs import RequestDelta, TokenLogprob
from lmserve.engine.prompt_limits import check_logit_bias, check_prompt_ids
from lmserve.engine.protocol import EngineStats, ModelInfo
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.runner import Runner, make_runner
from lmserve.engine.sampler import SampleResult, token_logprob
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.scheduler import Scheduler, step_token_budget
from lmserve.engine.step_budget import TARGET_STEP_S, engine_step_budget
from lmserve.engine.structured.manager import StructuredOutputManager
from lmserve.engine.tokenizer import Tokenizer
from lmserve.errors import InvalidRequestError

log = logging.getLogger(__name__)


# warm_idle keeps this many tokens of never-used KV blocks mapped ahead of use (a burst of 16
# prompts of 400 tokens), touching at most this many bytes of one cache tensor per call. Mapping
# memory is slow in a virtual machine: a 2 MiB transparent huge page costs 3-7 ms on a 2-core EPYC.
# When a call covered its blocks in every layer's keys and values, 8 MiB in all, it took 20-44 ms,
# and the first one 360 ms (each of the default model's 60 cache tensors faulted a fresh huge page);
# a request arriving meanwhile waited that long for its first step. One tensor and 1 MiB a call:
# 5-9 ms, at most one fault in most calls.
WARM_AHEAD_TOKENS = 8192
WARM_SLICE_BYTES = 1 << 20


@dataclass
class _Live:
    """Engine-side companions of a request that the scheduler does not need."""

    request: Request
    detok: IncrementalDetokenizer


class LLMEngine:
    """Continuous batching over a paged KV cache for one model replica (implements ``EngineCore``)."""

    def __init__(self, config: EngineConfig, runner: Runner | None = None,
                 target_step_s: float = TARGET_STEP_S) -> None:
        self.config = config
        self.tokenizer = Tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.runner = runner or make_runner(config)
        mc = self.runner.model_config
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        # A request must fit the cache alone, or it could preempt itself forever.
        self.max_model_len = min(mc.max_model_len, self.runner.num_blocks * config.block_size)
        device_type = self.runner.device.type
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs,
            step_token_budget(config.max_num_batched_tokens, config.max_num_seqs, device_type),
            engine_step_budget(config.max_num_batched_tokens, config.max_num_seqs, device_type, target_step_s))
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.structured = StructuredOutputManager(self.tokenizer.hf, mc.vocab_size, self.tokenizer.eos_token_ids)
        self.sampler = make_sampler(self.runner.device, config.seed, self.structured.apply_masks,
                                    eos_token_ids=sorted(self.eos_token_ids),
                                    argmax=getattr(getattr(self.runner, "ops", None), "argmax_rows", None))
        self._compiling: list[Request] = []  # constrained requests whose grammar is not compiled yet
        self._live: dict[str, _Live] = {}
        self._aborted: list[RequestDelta] = []
        self._generated_tokens = self._steps = 0
        if self._maps_on_first_write():  # the cache's pages are mapped as warm_idle or a step writes them
            self.block_manager.mapped = 0
        self._warming: tuple[int, int, int] | None = None  # (first, end, next tensor) of the blocks being mapped
        kv_tokens = self.runner.num_blocks * config.block_size
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB); fits %.1f requests of %d tokens",
                 self.runner.num_blocks, config.block_size, kv_tokens,
                 kv_tokens * self.runner.kv_spec.bytes_per_token / 2**30, kv_tokens / self.max_model_len,
                 self.max_model_len)

    # -- EngineCore ------------------------------------------------------------------------------
    @property
    def model_info(self) -> ModelInfo:
        mc = self.runner.model_config
        return ModelInfo(
            name=self.config.served_name or mc.path.name, max_model_len=self.max_model_len,
            vocab_size=mc.vocab_size, dtype=str(self.runner.dtype).removeprefix("torch."),
            device=str(self.runner.device), tensor_parallel_degree=self.config.tensor_parallel_degree,
            eos_token_ids=tuple(sorted(self.eos_token_ids)), max_num_seqs=self.scheduler.max_num_seqs,
            max_num_batched_tokens=self.scheduler.max_num_batched_tokens,
            kv_cache_tokens=self.runner.num_blocks * self.config.block_size)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self._live:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt_ids("inputs", token_ids, self.max_model_len, self.runner.model_config.vocab_size)
        check_logit_bias(params, self.runner.model_config.vocab_size)
        request = Request(request_id, token_ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.stop, params.skip_special_tokens,
                                       params.include_stop_str_in_output)
        self._live[request_id] = _Live(request, detok)
        if params.structured is not None:
            self.structured.add(request)
            self._compiling.append(request)
        else:
            self.scheduler.add(request)

    def abort_request(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)
        if live is None:
            return
        if live.request in self._compiling:
            self._compiling.remove(live.request)
        self.scheduler.finish(live.request, RequestStatus.FINISHED_ABORTED)
        self._release(request_id)
        self._aborted.append(self._delta(live, [], None, "abort"))

    def shutdown(self) -> None:
        """Stop what the runner started (a tensor-parallel group's worker processes). The engine
        cannot step afterwards. Its owner calls this on the way out: a spawned process joins its
        children before it exits, and the ranks ignore the SIGTERM that would otherwise end them."""
        self.runner.shutdown()

    def warm_idle(self) -> bool:
        """Idle-time work: map the pages of the next never-used KV blocks, up to ``WARM_AHEAD_TOKENS``
        ahead of the highest block handed out, one cache tensor (a layer's keys or values) and at
        most ``WARM_SLICE_BYTES`` of it per call (a few milliseconds, so a request that arrives
        meanwhile barely waits). Returns whether more is left. The blocks a burst of prompts takes
        next then cost no page faults inside its steps; the pages stay mapped, so the cache's
        resident memory runs that far ahead of its use."""
        if not self._maps_on_first_write():
            return False
        bm = self.block_manager
        tensors = self.runner.num_kv_tensors
        per_block = self.config.block_size * self.runner.kv_spec.bytes_per_token // tensors
        target = min(bm.num_blocks, bm.high_water + -(-WARM_AHEAD_TOKENS // self.config.block_size))
        first = max(bm.mapped, bm.high_water)
        if first >= target:
            return False
        if self._warming is None or self._warming[0] != first:  # a new range, or requests took blocks of it
            self._warming = (first, min(target, first + max(1, WARM_SLICE_BYTES // per_block)), 0)
        first, end, tensor = self._warming
        self.runner.fault_in_blocks(first, end, tensor)
        if tensor + 1 < tensors:
            self._warming = (first, end, tensor + 1)
            return True
        self._warming, bm.mapped = None, end
        return end < target

    def _maps_on_first_write(self) -> bool:
        """Whether the KV cache's memory is mapped on first write (the CPU), block ranges at a time
        by ``fault_in_blocks``; device memory is allocated up front."""
        return self.runner.device.type == "cpu" and hasattr(self.runner, "fault_in_blocks")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted or self._compiling)

    def step(self) -> list[RequestDelta]:
        deltas = self._admit_compiled()
        batch = self.scheduler.schedule()
        if batch.requests:
            started = time.perf_counter()
            logits = self.runner.execute(self.runner.prepare(batch.requests, batch.num_new_tokens))
            logits = self._score_prompts(logits, batch.requests, batch.num_new_tokens)
            sampled = self._sample(logits, batch.to_sample)
            self.scheduler.update(batch, sampled.token_ids)
            self.scheduler.budget.record(batch.total_tokens, len(batch), time.perf_counter() - started)
            deltas += self._emit(batch.to_sample, sampled)
        self._steps += 1
        if self._aborted:
            deltas, self._aborted = self._aborted + deltas, []
        return deltas

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_preempted_total=self.scheduler.num_preemptions, kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_free=self.block_manager.num_free_blocks, prompt_tokens_total=self.scheduler.num_prompt_tokens,
            generation_tokens_total=self._generated_tokens,
            prefix_cache_hit_tokens_total=self.block_manager.prefix_hit_tokens, steps_total=self._steps)

    # -- one step --------------------------------------------------------------------------------
    def _admit_compiled(self) -> list[RequestDelta]:
        """Hand requests whose grammar is compiled to the scheduler; fail those whose grammar could
        not be compiled. With nothing else to do, wait a little for a compilation."""
        if not self._compiling:
            return []
        if not self.scheduler.has_unfinished():
            self.structured.wait_any([r.request_id for r in self._compiling], timeout_s=0.05)
        failed: list[RequestDelta] = []
        for req in [r for r in self._compiling if self.structured.is_ready(r.request_id)]:
            self._compiling.remove(req)
            error = self.structured.error(req.request_id)
            if error is None:
                self.scheduler.add(req)
            else:
                failed.append(self._fail(req, error))
        return failed

    def _fail(self, req: Request, error: InvalidRequestError) -> RequestDelta:
        live = self._live.pop(req.request_id)
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        self._release(req.request_id)
        delta = self._delta(live, [], None, "error")
        delta.error, delta.error_kind, delta.error_field = error.message, "invalid_request", error.field
        return delta

    def _release(self, request_id: str) -> None:
        self.sampler.release(request_id)
        self.structured.release(request_id)

    def _score_prompts(self, logits: torch.Tensor | None, requests: list[Request],
                       num_new: list[int]) -> torch.Tensor | None:
        """Record the prompt log-probabilities of the rows that score prompt tokens (see
        ``Request.prompt_logprob_positions``, which ``prepare`` followed), and return the rows to
        sample from. Costs nothing when no request asked."""
        if logits is None or all(r.params.prompt_logprobs is None for r in requests):
            return logits
        keep, row = [], 0
        for req, n in zip(requests, num_new, strict=True):
            positions = req.prompt_logprob_positions(n)
            if positions:
                lp = torch.log_softmax(logits[row:row + len(positions)].float(), dim=-1)
                req.prompt_logprobs.extend(token_logprob(lp[k], req.prompt_token_ids[p + 1], req.params.prompt_logprobs
                                                          or 0) for k, p in enumerate(positions))  # fmt: skip
                row += len(positions)
            if req.num_computed_tokens + n == req.num_tokens:
                keep.append(row)
                row += 1
        return logits[keep]

    def _sample(self, logits: torch.Tensor | None, requests: list[Request]) -> SampleResult:
        if not requests:
            return SampleResult([], [])
        assert logits is not None and logits.shape[0] == len(requests)
        return self.sampler(logits, requests)

    def _emit(self, requests: list[Request], sampled: SampleResult) -> list[RequestDelta]:
        """Each sampled request's delta, after its stop conditions are checked."""
        return [self._emit_token(self._live[req.request_id], token, logprob)
                for req, token, logprob in zip(requests, sampled.token_ids, sampled.logprobs, strict=True)]

    def _emit_token(self, live: _Live, token: int, logprob: TokenLogprob | None) -> RequestDelta:
        req, detok = live.request, live.detok
        self._generated_tokens += 1
        detok.add_tokens([token])
        grammar_done = False
        if req.params.structured is not None:
            try:
                grammar_done = self.structured.accept(req, token)
            except InvalidRequestError as exc:
                return self._fail(req, exc)
        reason = "stop" if grammar_done else self._stop_reason(req, token, detok)
        if reason is not None:
            detok.flush()
            status = RequestStatus.FINISHED_LENGTH if reason == "length" else RequestStatus.FINISHED_STOPPED
            self.scheduler.finish(req, status)
            self._release(req.request_id)
            del self._live[req.request_id]
        return self._delta(live, [token], [logprob] if logprob is not None else None, reason)

    def _stop_reason(self, req: Request, token: int, detok: IncrementalDetokenizer) -> str | None:
        p = req.params
        if req.num_output_tokens >= p.min_new_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                req.stop_reason = None
                return "stop"
            if token in p.stop_token_ids:
                req.stop_reason = token
                return "stop"
            if detok.stop_string is not None:
                req.stop_reason = detok.stop_string
                return "stop"
        if req.num_output_tokens >= p.max_new_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _delta(self, live: _Live, tokens: list[int], logprobs: list[TokenLogprob] | None,
               finish_reason: str | None) -> RequestDelta:
        req = live.request
        return RequestDelta(
            request_id=req.request_id, token_ids=tokens,
            text=live.detok.take_new_text(finished=finish_reason is not None), logprobs=logprobs,
            finish_reason=finish_reason, stop_reason=req.stop_reason if finish_reason == "stop" else None,
            num_prompt_tokens=req.num_prompt_tokens, num_generated_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            prompt_logprobs=req.prompt_logprobs if tokens and req.num_output_tokens == 1 and
            req.params.prompt_logprobs is not None else None)  # fmt: skip


