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

import numpy as np
import torch

from lmserve.engine.outputs import TokenLogprob
from lmserve.engine.penalties import apply_penalties
from lmserve.engine.request import Request

LogitsMask = Callable[[torch.Tensor, Sequence[Request]], None]
# Top-p first looks among the tokens at least this share as likely as the most likely one (see
# _sample_top_p) ...
_TOP_P_FLOOR = 2.0**-10
# ... when there are at most this many; more, and it sorts the probabilities alone (np.sort).
_TOP_P_CANDIDATES = 4096


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Stateless but for the per-request random generators it keeps for seeded requests."""

    def __init__(self, seed: int = 0, logits_mask: LogitsMask | None = None, *,
                 eos_token_ids: Sequence[int] = (), argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self._mask = logits_mask
        # The greedy rows' argmax: the compiled kernel's where there is one (``Ops.argmax_rows``: torch's
        # CPU argmax tracks its index element by element, a tenth of the speed of its own max).
        self._argmax = argmax or (lambda x: x.argmax(dim=-1))
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
        sampled = [i for i, req in enumerate(requests) if not req.params.greedy]
        greedy = self._argmax(logits) if len(sampled) < len(requests) else None  # a pass over the vocabulary
        token_ids = greedy.tolist() if greedy is not None else [0] * len(requests)
        if sampled:
            self._sample(logits, requests, sampled, token_ids)
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if want:
            lp = torch.log_softmax(logits[want], dim=-1)
            for row, i in enumerate(want):
                logprobs[i] = token_logprob(lp[row], token_ids[i], requests[i].params.logprobs or 0)
        return SampleResult(token_ids, logprobs)

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request], sampled: list[int],
                token_ids: list[int]) -> None:  # fmt: skip
        """Draw the tokens of the ``sampled`` rows into ``token_ids``: one uniform number per row
        from the request's generator, then top-k rows over their candidates alone, the others over
        softmax numerators made in place on one copy (the draws compare them within a row only, so
        the division by the row's sum is never needed)."""
        vocab = logits.shape[-1]
        uniform = torch.zeros(len(requests))
        for i in sampled:
            uniform[i] = float(torch.rand(1, dtype=torch.float64, generator=self._generator(requests[i])))
        full = []
        for i in sampled:
            p = requests[i].params
            if 0 < p.top_k < vocab:
                values, indices = logits[i].topk(p.top_k)
                probs = torch.softmax(values / p.temperature, dim=-1)
                token_ids[i] = _sample_candidates(probs, indices, p.top_p, uniform[i : i + 1])
            else:
                full.append(i)
        if not full:
            return
        temperatures = torch.tensor([requests[i].params.temperature for i in full])
        rows = logits if len(full) == len(requests) else logits[full]
        weights = rows / temperatures[:, None]  # a new tensor: logprobs still read the logits
        weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()
        plain = [k for k, i in enumerate(full) if requests[i].params.top_p >= 1.0]
        if plain:  # no filter: one cumulative sum and search for all these rows
            rows = weights if len(plain) == len(full) else weights[plain]
            chosen = _draw(rows, uniform[[full[k] for k in plain]]).tolist()
            for k, token in zip(plain, chosen, strict=True):
                token_ids[full[k]] = token
        for k, i in enumerate(full):
            if requests[i].params.top_p < 1.0:
                token_ids[i] = _sample_top_p(weights[k], requests[i].params.top_p, uniform[i : i + 1])


def _draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` (``[rows, n]``, non-negative, in proportion to the
    probabilities), drawn with the ``uniform`` numbers in [0, 1) (``[rows]``) against the cumulative
    sums: a few passes over the row, where ``torch.multinomial`` over a 49k vocabulary took 1.4 ms a
    row, 11 ms for a decode step of 8 sampled rows, a quarter of the step itself."""
    cdf = weights.cumsum(dim=-1)
    targets = (uniform * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_(max=weights.shape[-1] - 1)


def _sample_top_p(weights: torch.Tensor, top_p: float, uniform: torch.Tensor) -> int:
    """One draw from a row of softmax numerators (the most likely token's is 1), among the smallest
    set of most likely tokens whose mass reaches ``top_p``.

    When the tokens at least ``_TOP_P_FLOOR`` as likely as the most likely one hold that mass (the
    peaked distributions language models usually give), the set is among them: a comparison finds
    them and only they are sorted. Else the probabilities alone are sorted for the threshold
    (``torch.sort`` with indices of a 49k vocabulary took 4 ms a row). ``topk`` of 256, which this
    replaced, took 79 us a row of 49k, more than the whole peaked path now (2-core AMD EPYC)."""
    row = weights.numpy()
    need = top_p * float(row.sum(dtype=np.float64))
    candidates = np.flatnonzero(row >= _TOP_P_FLOOR)
    values = row[candidates]
    if len(candidates) <= _TOP_P_CANDIDATES and float(values.sum(dtype=np.float64)) >= need:
        order = np.argsort(-values, kind="stable")
        return int(candidates[order[_draw_rank(values[order], need, float(uniform))]])
    return _draw_sorted(row, need, float(uniform))  # a flat distribution: the set is larger


def _draw_rank(ordered: np.ndarray, need: float, uniform: float) -> int:
    """A rank drawn with ``uniform`` among the first of ``ordered`` (numerators, descending) whose
    mass reaches ``need``, each in proportion to its value."""
    cumulative = np.cumsum(ordered, dtype=np.float64)
    size = max(1, int(np.count_nonzero(cumulative - ordered < need)))
    return min(int(np.searchsorted(cumulative[:size], uniform * cumulative[size - 1], side="right")), size - 1)


def _draw_sorted(row: np.ndarray, need: float, uniform: float) -> int:
    """One draw among the smallest set of most likely tokens of ``row`` (numerators) whose mass
    reaches ``need``, by the values sorted alone (numpy sorts values 3x faster than ``torch.sort``
    with indices). The draw picks a rank; the token is the one of that value, the k-th of equal
    values in vocabulary order for the k-th rank among them, so ties share their mass evenly. Drawing
    in the sorted values instead of masking and summing the whole row again took a flat 49k-token
    row from ~0.8 to ~0.3 ms."""
    ordered = np.sort(row)[::-1]
    rank = _draw_rank(ordered, need, uniform)
    value = ordered[rank]
    first_equal = int(np.searchsorted(-ordered, -value, side="left"))  # ordered is descending
    return int(np.flatnonzero(row == value)[rank - first_equal])


def _sample_candidates(probs: torch.Tensor, indices: torch.Tensor, top_p: float, uniform: torch.Tensor) -> int:
    """One of ``indices`` drawn by ``probs`` (descending, summing to at most 1), after keeping the
    smallest prefix whose mass reaches ``top_p`` (at least one)."""
    if top_p < 1.0:
        cumulative = probs.cumsum(dim=-1)
        probs = probs[: max(1, int(((cumulative - probs) < top_p).sum()))]
    return int(indices[int(_draw(probs.unsqueeze(0), uniform))])



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
