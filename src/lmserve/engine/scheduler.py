"""Which requests run in the next step, and how many of their tokens.

Each step has a token budget (``budget``: ``step_budget.py`` sizes it from the measured speed)
shared by at most ``max_num_seqs`` running requests. Running requests are served first, in admission order: a decoding request needs one token,
a request in chunked prefill needs the rest of its prompt (capped by what is left of the budget,
unless that rest overshoots it by at most ``WHOLE_PROMPT_SLACK`` of a budget: see ``_chunk``).
Then waiting requests are admitted while budget, sequence slots and KV blocks last; a prefix-cache hit
simply starts a request with some tokens already computed. When KV blocks run out, the most recently
admitted running request is preempted: its blocks are freed and it waits, at the head of the queue,
to recompute everything later (prompt and generated tokens alike).

After the model has run a step, ``update`` records its results: the scheduled tokens are computed
(their full blocks join the prefix cache) and each caught-up request gets the token sampled for it.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.step_budget import StepBudget, budget_cap

# A prompt whose rest overshoots what is left of a step's budget by at most this share of the budget
# is computed whole: the step then ends at its last token, where its first output token comes from,
# instead of leaving a remnant that delays that token by a whole further step. Bursts of prompts
# served on a 2-core EPYC (one process, 8 alternating rounds, twice): median first token of 16
# prompts of 200 tokens 593 -> 554 ms and 539 -> 515 ms; of 16 prompts of 64-512 tokens 804 -> 728 ms
# and 848 -> 744 ms, the bursts' total time unchanged or shorter. A slack of 1.0 did no better.
WHOLE_PROMPT_SLACK = 0.5


def step_token_budget(max_num_batched_tokens: int | None, max_num_seqs: int, device_type: str) -> int:
    """The most tokens one step may compute (what activation memory is planned for); the budget of
    each step is ``Scheduler.budget``, at most this."""
    return budget_cap(max_num_batched_tokens, max_num_seqs, device_type)


@dataclass
class ScheduledBatch:
    """One step's work: requests and how many new tokens each computes, in execution order."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Requests whose new tokens reach their last token, so the step samples their next one (in order).
    to_sample: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    """Continuous batching over the paged KV cache."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 budget: StepBudget | None = None) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens  # the most any step computes
        # This step's share of it; adaptive budgets follow the measured speed (``step_budget.py``).
        self.budget = budget or StepBudget(max_num_batched_tokens, max_num_batched_tokens, max_num_batched_tokens,
                                           adaptive=False)  # fmt: skip
        assert self.budget.cap <= max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # prompt tokens computed, recomputation after preemption excluded

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.budget.tokens)
        if not batch.preempted:  # no point admitting new work while memory is short
            self._schedule_waiting(batch, budget)
        batch.to_sample = [r for r, n in zip(batch.requests, batch.num_new_tokens, strict=True)
                           if r.num_computed_tokens + n == r.num_tokens]
        return batch

    def update(self, batch: ScheduledBatch, sampled: Sequence[int]) -> None:
        """Record a step's results: every scheduled token is now computed, and ``sampled[i]`` is the
        next token of ``batch.to_sample[i]``."""
        for request, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            if request.num_output_tokens == 0 and request.num_computed_tokens < request.num_prompt_tokens:
                self.num_prompt_tokens += min(n, request.num_prompt_tokens - request.num_computed_tokens)
            request.num_computed_tokens += n
            self.blocks.cache_computed_blocks(request)
        for request, token in zip(batch.to_sample, sampled, strict=True):
            request.output_token_ids.append(token)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._chunk(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                batch.requests.append(request)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: nothing after it is scheduled either
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            # A request that scores its prompt computes all of it: cached blocks have no logits.
            cacheable = not request.block_ids and request.params.prompt_logprobs is None
            prefix = self.blocks.find_cached_prefix(request) if cacheable else []
            computed = request.num_computed_tokens + len(prefix) * self.blocks.block_size
            num_new = self._chunk(request.num_tokens - computed, budget)
            if not self.blocks.allocate(request, num_new, prefix):
                break
            self.waiting.popleft()
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = len(prefix) * self.blocks.block_size
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _chunk(self, remaining: int, left: int) -> int:
        """How many of a request's ``remaining`` prompt tokens this step computes, ``left`` of its
        budget being unused: all of them when they fit, or when they overshoot by at most
        ``WHOLE_PROMPT_SLACK`` of the budget and the step stays within ``max_num_batched_tokens``;
        else a chunk of ``left``."""
        used = self.budget.tokens - left
        if remaining <= left or (remaining - left <= self.budget.tokens * WHOLE_PROMPT_SLACK
                                 and used + remaining <= self.max_num_batched_tokens):
            return remaining
        return left

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues for good and free its blocks."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(request)
        self.blocks.free(request)
