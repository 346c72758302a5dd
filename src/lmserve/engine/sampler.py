"""Choosing the next token of each request from its logits.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then draw with their
own ``torch.Generator`` when the request has a seed, so a seeded request gives the same tokens
whatever else shares its batch. Repetition penalty (as in Hugging Face: divide positive logits,
multiply negative ones, for every token already in prompt or output) applies to both, and so do
OpenAI's presence and frequency penalties, logit bias and the ``min_new_tokens`` ban on stopping
(``lmserve.engine.penalties``).

A ``logits_mask`` (the engine's structured-output constraints) runs first, in place, so every later
step, greedy or sampled, sees only the tokens each request's grammar allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmserve.engine.outputs import TokenLogprob
from lmserve.engine.penalties import apply_penalties
from lmserve.engine.request import Request

LogitsMask = Callable[[torch.Tensor, Sequence[Request]], None]


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Stateless but for the per-request random generators it keeps for seeded requests."""

    def __init__(self, seed: int = 0, logits_mask: LogitsMask | None = None, *,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self._mask = logits_mask
        self._eos_token_ids = tuple(eos_token_ids)
        self._default = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        if request.params.seed is None:
            return self._default
        gen = self._generators.get(request.request_id)
        if gen is None:
            gen = self._generators[request.request_id] = torch.Generator().manual_seed(request.params.seed)
        return gen

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """``logits``: [len(requests), vocab] float32 on the CPU."""
        logits = logits.float()
        if self._mask is not None:
            self._mask(logits, requests)
        for i, req in enumerate(requests):
            if req.params.repetition_penalty != 1.0:
                _apply_repetition_penalty(logits[i], req.all_token_ids, req.params.repetition_penalty)
        apply_penalties(logits, requests, self._eos_token_ids)
        token_ids = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(requests):
            if not req.params.greedy:
                token_ids[i] = self._sample_row(logits[i], req)
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if want:
            lp = torch.log_softmax(logits[want], dim=-1)
            for row, i in enumerate(want):
                logprobs[i] = token_logprob(lp[row], token_ids[i], requests[i].params.logprobs or 0)
        return SampleResult(token_ids, logprobs)

    def _sample_row(self, row: torch.Tensor, req: Request) -> int:
        p = req.params
        scaled = row / p.temperature
        vocab = scaled.shape[-1]
        if 0 < p.top_k < vocab:
            values, indices = scaled.topk(p.top_k)
        elif p.top_p < 1.0:
            values, indices = scaled.sort(descending=True)
        else:
            probs = torch.softmax(scaled, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self._generator(req)).item())
        probs = torch.softmax(values, dim=-1)
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            cumulative = probs.cumsum(dim=-1)
            keep = (cumulative - probs) < p.top_p
            probs = probs * keep
        choice = torch.multinomial(probs, 1, generator=self._generator(req))
        return int(indices[choice].item())


def _apply_repetition_penalty(row: torch.Tensor, seen: list[int], penalty: float) -> None:
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long)
    if ids.numel() == 0:
        return
    values = row.index_select(0, ids)
    row.index_copy_(0, ids, torch.where(values > 0, values / penalty, values * penalty))


def token_logprob(lp: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """``token_id``'s log-probability in ``lp`` (one row of log-softmax) and the ``top_n`` most likely."""
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        values, indices = lp.topk(top_n)
        top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(lp[token_id]), top)
