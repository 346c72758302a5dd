"""How many tokens one engine step may compute, sized from how fast this machine computes them.

A step's duration is the pause every running request sees between two of its tokens, and a prompt
that arrives finishes its prefill at the end of the step that holds its last chunk. A constant
token budget is too small on a fast machine (overhead per step dominates) and too large on a slow
or contended one (at the 1,000 prefill tokens/s of a small model on 2 cores, a 512-token step holds
every running decode for half a second, and the first token of every prompt in it). So the budget aims at a step *time*: the engine
reports each step's tokens and seconds, ``StepBudget`` keeps a moving estimate of the tokens per
second of steps that filled most of their budget (the prefill-bound ones: decode-only steps measure
per-step overhead, not prefill speed), and the budget is that speed times ``target_step_s``,
between ``floor`` (every running request must be able to decode, and a step must stay large enough
to amortize its own overhead) and ``cap`` (what the activation memory was planned for). An
operator's ``option.max_rolling_batch_prefill_tokens`` fixes it.
"""

from __future__ import annotations

# A served step this long delays every running stream's next token by as much, and a burst of prompts
# gets its first tokens in order at the ends of such steps; it is still long enough to amortize the
# per-step work (scheduling, tensors, sampling, streaming the weights: ~10 ms on a 2-core CPU). On a
# 2-core EPYC, bursts of 16 prompts of 200 tokens (two servers side by side, 6 rounds each) got
# their median first token after 654 ms at 0.1 s against 674 ms at 0.2 s, at the same output tokens/s.
TARGET_STEP_S = 0.1
# Offline generation (``LLM``) returns when the whole batch is done: nobody waits between two
# steps, so its steps are larger, and the GEMMs run at more rows: 5% more output tokens/s there.
OFFLINE_TARGET_STEP_S = 0.2
SMOOTHING = 0.3
GRAIN = 16  # budgets are multiples of this many tokens


class StepBudget:
    """The token budget of the next step; ``record`` each step's tokens and duration."""

    def __init__(self, initial: int, floor: int, cap: int, target_step_s: float = TARGET_STEP_S,
                 adaptive: bool = True) -> None:
        assert 1 <= floor <= cap and target_step_s > 0
        self.floor, self.cap, self.target_step_s, self.adaptive = floor, cap, target_step_s, adaptive
        self.tokens = min(max(initial, floor), cap)
        self.tokens_per_s: float | None = None  # the prefill-bound speed measured so far

    def record(self, num_tokens: int, num_requests: int, seconds: float) -> None:
        """One step computed ``num_tokens`` tokens of ``num_requests`` requests in ``seconds`` (model,
        sampling and bookkeeping). Only a step with prompt tokens that used at least half its budget
        says how fast prefill runs: a decode-only step (one token per request) measures overhead."""
        if not self.adaptive or seconds <= 0 or num_tokens <= num_requests or num_tokens * 2 < self.tokens:
            return
        rate = num_tokens / seconds
        self.tokens_per_s = rate if self.tokens_per_s is None else (
            SMOOTHING * rate + (1 - SMOOTHING) * self.tokens_per_s)
        wanted = int(self.tokens_per_s * self.target_step_s) // GRAIN * GRAIN
        self.tokens = min(max(wanted, self.floor), self.cap)

# Before any speed is measured, a step computes this many tokens (the budget lmserve used before it
# measured anything) ...
FIRST_CPU_BUDGET = 512
FIRST_CUDA_BUDGET = 4096
# ... and at most this many once it has: activation memory is planned for the cap.
CPU_BUDGET_CAP = 2048
CUDA_BUDGET_CAP = 4096
# Never fewer than this (nor than max_num_seqs): on a slow or crowded machine the per-step work
# (scheduling, tensors, sampling) would otherwise take a growing share of ever smaller steps, and
# the measured speed, which includes it, would shrink the budget further. On a 2-core CPU shared
# with ten busy processes the budget fell to 16-32 tokens and a burst of 16 prompts took 150-200
# steps instead of 14, with a later median first token than a fixed 512 in two runs of three.
BUDGET_FLOOR = 256


def budget_cap(configured: int | None, max_num_seqs: int, device_type: str) -> int:
    """The most tokens one step may compute: ``option.max_rolling_batch_prefill_tokens``, else the
    device's cap; never below ``max_num_seqs``, so every running request can decode each step."""
    cap = configured or (CUDA_BUDGET_CAP if device_type == "cuda" else CPU_BUDGET_CAP)
    return max(cap, max_num_seqs)


def engine_step_budget(configured: int | None, max_num_seqs: int, device_type: str,
                       target_step_s: float = TARGET_STEP_S) -> StepBudget:
    """The engine's budget: fixed at ``configured`` when the operator set one, else adaptive,
    aiming at steps of ``target_step_s``."""
    cap = budget_cap(configured, max_num_seqs, device_type)
    if configured:
        return StepBudget(cap, cap, cap, adaptive=False)
    first = FIRST_CUDA_BUDGET if device_type == "cuda" else FIRST_CPU_BUDGET
    return StepBudget(first, min(max(max_num_seqs, BUDGET_FLOOR), cap), cap, target_step_s)
