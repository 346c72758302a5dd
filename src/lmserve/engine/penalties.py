"""OpenAI's logit adjustments, applied to a step's logits before a token is chosen.

- ``presence_penalty`` and ``frequency_penalty`` (OpenAI's semantics: over the tokens generated so
  far, not the prompt): ``logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``;
- ``logit_bias``: ``logit[t] += bias`` for the token ids the request names;
- ``min_new_tokens``: until a request has that many tokens, its end-of-sequence and stop token ids
  cannot be chosen (except under a structured-output constraint: there the grammar decides where
  the output may end, and banning its only allowed token would leave none).

Each adjustment is one batched tensor operation over the rows that use it; a row that uses none
costs one attribute check, so requests without them pay nothing measurable.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from lmserve.engine.request import Request


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request], eos_token_ids: Collection[int] = ()) -> None:
    """Adjust ``logits`` ([len(requests), vocab], float32) in place."""
    rows = [i for i, r in enumerate(requests) if r.params.presence_penalty or r.params.frequency_penalty]
    if rows:
        _presence_frequency(logits, [requests[i] for i in rows], rows)
    rows = [i for i, r in enumerate(requests) if r.params.logit_bias]
    if rows:
        _bias(logits, [requests[i] for i in rows], rows)
    rows = [i for i, r in enumerate(requests)
            if r.num_output_tokens < r.params.min_new_tokens and r.params.structured is None]
    if rows:
        _ban_stops(logits, [requests[i] for i in rows], rows, eos_token_ids)


def _presence_frequency(logits: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
    vocab = logits.shape[-1]
    counts = torch.zeros(len(reqs), vocab, dtype=logits.dtype)
    row_idx = torch.tensor([k for k, r in enumerate(reqs) for _ in r.output_token_ids], dtype=torch.long)
    tok_idx = torch.tensor([t for r in reqs for t in r.output_token_ids], dtype=torch.long)
    if tok_idx.numel():
        counts.index_put_((row_idx, tok_idx), torch.ones(tok_idx.numel(), dtype=logits.dtype), accumulate=True)
    freq = torch.tensor([r.params.frequency_penalty for r in reqs], dtype=logits.dtype).unsqueeze(1)
    pres = torch.tensor([r.params.presence_penalty for r in reqs], dtype=logits.dtype).unsqueeze(1)
    index = torch.tensor(rows, dtype=torch.long)
    logits[index] -= freq * counts + pres * (counts > 0).to(logits.dtype)


def _bias(logits: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
    row_idx = torch.tensor([rows[k] for k, r in enumerate(reqs) for _ in r.params.logit_bias], dtype=torch.long)
    tok_idx = torch.tensor([t for r in reqs for t, _ in r.params.logit_bias], dtype=torch.long)
    values = torch.tensor([b for r in reqs for _, b in r.params.logit_bias], dtype=logits.dtype)
    logits.index_put_((row_idx, tok_idx), values, accumulate=True)


def _ban_stops(logits: torch.Tensor, reqs: list[Request], rows: list[int], eos_token_ids: Collection[int]) -> None:
    vocab = logits.shape[-1]
    pairs = [(rows[k], t) for k, r in enumerate(reqs)
             for t in {*(() if r.params.ignore_eos else eos_token_ids), *r.params.stop_token_ids} if t < vocab]
    if pairs:
        row_idx, tok_idx = zip(*pairs, strict=True)
        logits[torch.tensor(row_idx), torch.tensor(tok_idx)] = float("-inf")
