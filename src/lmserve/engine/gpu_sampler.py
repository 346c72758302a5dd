"""Choosing the next tokens on the device that made the logits, as batched tensor ops, with one
device-to-host copy per step.

The same interface and the same semantics as ``Sampler`` (engine/sampler.py): greedy rows take the
argmax; sampled rows apply temperature, top-k and top-p; repetition penalty as in Hugging Face;
presence and frequency penalties as in OpenAI (subtracted per occurrence in the output) when the
request's parameters have them; log-probabilities of the penalised logits, with top-n alternatives.

Sampling is an exponential race: with ``E_v ~ Exp(1)`` drawn per vocabulary entry, ``argmax p_v / E_v``
is distributed as ``p`` (the Gumbel-max trick in another form), so one batched argmax samples every
row, and a seeded row draws its ``E`` from its own generator: the same tokens whatever shares its
batch. The draws are not the CPU sampler's (``torch.multinomial`` on a CPU generator): the CUDA and
CPU generators give different streams for one seed, so token-for-token identity across devices is
not achievable; greedy decoding and the filtered distributions are the same.

A step with a request this sampler does not handle itself (structured output: its token masks live
with the CPU sampler) goes to the CPU ``Sampler`` whole, logits copied to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmserve.engine.outputs import TokenLogprob
from lmserve.engine.request import Request
from lmserve.engine.sampler import LogitsMask, Sampler, SampleResult


class GpuSampler:
    """Batched sampling on ``device``; keeps a generator per seeded request, on that device."""

    def __init__(self, device: torch.device | str, seed: int = 0, logits_mask: LogitsMask | None = None, *,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self.device = torch.device(device)
        self._default = torch.Generator(device=self.device).manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.host = Sampler(seed, logits_mask, eos_token_ids=eos_token_ids)  # for steps this sampler does not handle

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(request_id, None)
        self.host.release(request_id)

    def _generator(self, request: Request) -> torch.Generator:
        seed = request.params.seed
        assert seed is not None
        gen = self._generators.get(request.request_id)
        if gen is None:
            gen = self._generators[request.request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return gen

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """``logits``: [len(requests), vocab] on this sampler's device."""
        if any(_needs_host(r) for r in requests):
            return self.host(logits.float().cpu(), requests)
        logits = logits.to(self.device, torch.float32)
        logits = _apply_penalties(logits, requests, self.device)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled:
            rows = _upload(sampled, torch.long, self.device)
            drawn = self._sample(logits.index_select(0, rows), [requests[i] for i in sampled])
            tokens = tokens.index_copy(0, rows, drawn)
        return self._to_host(logits, tokens, requests)

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """One token per row of ``logits`` (every request sampled, none greedy)."""
        dev, vocab = self.device, logits.shape[-1]
        temps = _upload([r.params.temperature for r in requests], torch.float32, dev)
        scaled = logits / temps[:, None]
        top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in requests]
        top_p = [r.params.top_p if r.params.top_p < 1.0 else 2.0 for r in requests]  # 2: keep all
        order = None
        if min(top_k) < vocab or min(top_p) <= 1.0:
            scaled, order = scaled.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=dev)
            scaled = scaled.masked_fill(ranks[None, :] >= _upload(top_k, torch.long, dev)[:, None], float("-inf"))
            probs = scaled.softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            outside = (probs.cumsum(dim=-1) - probs) >= _upload(top_p, torch.float32, dev)[:, None]
            probs = probs.masked_fill(outside, 0.0)
        else:
            probs = scaled.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self._default)
        for i, r in enumerate(requests):
            if r.params.seed is not None:
                race[i].exponential_(generator=self._generator(r))
        choice = (probs / race).argmax(dim=-1)
        return choice if order is None else order.gather(1, choice[:, None]).squeeze(1)

    def _to_host(self, logits: torch.Tensor, tokens: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """Copy the tokens and the wanted log-probabilities back in one transfer (one host sync)."""
        want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        parts = [tokens.double()]
        top_n = max((requests[i].params.logprobs or 0 for i in want), default=0)
        if want:
            rows = _upload(want, torch.long, self.device)
            lp = torch.log_softmax(logits.index_select(0, rows), dim=-1)
            parts.append(lp.gather(1, tokens.index_select(0, rows)[:, None]).squeeze(1).double())
            if top_n:
                values, indices = lp.topk(top_n, dim=-1)
                parts += [values.double().flatten(), indices.double().flatten()]
        host = torch.cat(parts).cpu()  # float64 holds every token id exactly
        n, w = len(requests), len(want)
        token_ids = [int(t) for t in host[:n].tolist()]
        logprobs: list[TokenLogprob | None] = [None] * n
        chosen = host[n:n + w].tolist()
        values_h = host[n + w:n + w + w * top_n].view(w, top_n).tolist() if top_n else []
        indices_h = host[n + w + w * top_n:].view(w, top_n).tolist() if top_n else []
        for row, i in enumerate(want):
            k = requests[i].params.logprobs or 0
            top = tuple((int(t), float(v)) for t, v in zip(indices_h[row][:k], values_h[row][:k], strict=True)) if k else ()
            logprobs[i] = TokenLogprob(token_ids[i], float(chosen[row]), top)
        return SampleResult(token_ids, logprobs)


def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request], device: torch.device) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (HF: divide positive logits, multiply
    negative ones), then frequency and presence penalties over output tokens (OpenAI: subtract
    ``frequency * count + presence * (count > 0)``). Rows without penalties are untouched."""
    rep = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = _occurrences(logits.shape[-1], [requests[i].all_token_ids for i in rep], device) > 0
        penalty = _upload([requests[i].params.repetition_penalty for i in rep], torch.float32, device)[:, None]
        rows = _upload(rep, torch.long, device)
        sub = logits.index_select(0, rows)
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        logits = logits.index_copy(0, rows, torch.where(seen, penalised, sub))
    freq = [float(getattr(r.params, "frequency_penalty", 0.0) or 0.0) for r in requests]
    pres = [float(getattr(r.params, "presence_penalty", 0.0) or 0.0) for r in requests]
    counted = [i for i in range(len(requests)) if freq[i] or pres[i]]
    if counted:
        counts = _occurrences(logits.shape[-1], [requests[i].output_token_ids for i in counted], device)
        f = _upload([freq[i] for i in counted], torch.float32, device)[:, None]
        p = _upload([pres[i] for i in counted], torch.float32, device)[:, None]
        rows = _upload(counted, torch.long, device)
        sub = logits.index_select(0, rows)
        logits = logits.index_copy(0, rows, sub - f * counts - p * (counts > 0).float())
    return logits


def _occurrences(vocab: int, token_lists: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """``[len(token_lists), vocab]`` float counts of each token id per list (one upload)."""
    width = max((len(t) for t in token_lists), default=0)
    ids = torch.full((len(token_lists), width + 1), vocab, dtype=torch.long)  # column ``vocab`` is a sink
    for i, t in enumerate(token_lists):
        ids[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, _to_device(ids, device), torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def _upload(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=dtype), device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: a copy from pageable memory
    synchronises the stream, one from pinned memory is queued like a kernel."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _needs_host(request: Request) -> bool:
    """Whether a request uses what only the CPU sampler does: grammar masks, logit bias, and the
    ban on stopping before ``min_new_tokens``."""
    p = request.params
    return (p.structured is not None or bool(p.logit_bias)
            or request.num_output_tokens < p.min_new_tokens)


def make_sampler(device: torch.device | str, seed: int = 0,
                 logits_mask: LogitsMask | None = None, *, eos_token_ids: Sequence[int] = (),
                 argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Sampler | GpuSampler:
    """The sampler for logits on ``device``: batched on the device for CUDA, ``Sampler`` on the CPU;
    ``logits_mask`` is the structured-output hook, ``argmax`` the CPU greedy rows' (see ``Sampler``)."""
    if torch.device(device).type == "cuda":
        return GpuSampler(device, seed, logits_mask, eos_token_ids=eos_token_ids)
    return Sampler(seed, logits_mask, eos_token_ids=eos_token_ids, argmax=argmax)
