"""One request's life inside the engine.

A request carries counters, not phases: ``num_computed_tokens`` (tokens whose keys and values are in
the KV cache) against ``num_tokens`` (prompt plus generated). Prefill, chunked prefill, prefix-cache
hits, decode and recompute after preemption are all "compute the tokens not yet computed".
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from lmserve.engine.outputs import TokenLogprob
from lmserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Finished states sort last, so ``status > RUNNING`` means finished-or-beyond."""

    WAITING = 0
    PREEMPTED = 1
    RUNNING = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """The engine's record of one request. Mutated only by the engine's own thread."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    block_ids: list[int] = field(default_factory=list)
    stop_reason: str | int | None = None
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    # prompt_logprobs[p] scores prompt token p + 1 (the logits at position p predict it)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens ``start:stop`` of prompt + output, without building the whole list."""
        n_prompt = len(self.prompt_token_ids)
        if stop <= n_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:stop - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - n_prompt]

    def prompt_logprob_positions(self, num_new: int) -> range:
        """The positions of a step computing ``num_new`` tokens whose logits score a prompt token
        not scored yet (none unless ``params.prompt_logprobs``; none again after a preemption)."""
        if self.params.prompt_logprobs is None:
            return range(0)
        first = self.num_computed_tokens
        return range(max(first, len(self.prompt_logprobs)), min(first + num_new, self.num_prompt_tokens - 1))

    @property
    def is_finished(self) -> bool:
        return self.status.finished
