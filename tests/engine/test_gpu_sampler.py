"""The batched device sampler against the CPU sampler, on the CPU device (its code is device-generic),
and its host synchronisation on a CUDA device."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

from lmserve.engine.gpu_sampler import GpuSampler, make_sampler
from lmserve.engine.request import Request
from lmserve.engine.sampler import Sampler
from lmserve.engine.sampling_params import SamplingParams

VOCAB = 64


@dataclass(frozen=True)
class PenaltyParams(SamplingParams):
    """Parameters with OpenAI's penalties, which the sampler reads when the request has them."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def req(rid: str, prompt: list[int] | None = None, output: list[int] | None = None, **params: object) -> Request:
    r = Request(rid, prompt or [1, 2, 3], PenaltyParams(**params))  # type: ignore[arg-type]
    r.output_token_ids = list(output or [])
    return r


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_tokens_and_logprobs_match_the_cpu_sampler() -> None:
    requests = [req("a", logprobs=3), req("b", [5, 9, 9], [7], repetition_penalty=1.7, logprobs=0),
                req("c", [1, 2], [40, 41], repetition_penalty=0.6), req("d", logprobs=5)]
    logits = logits_for(4)
    want = Sampler()(logits.clone(), requests)
    got = GpuSampler("cpu")(logits.clone(), requests)
    assert got.token_ids == want.token_ids
    for g, w in zip(got.logprobs, want.logprobs, strict=True):
        assert (g is None) == (w is None)
        if g is not None and w is not None:
            assert g.token_id == w.token_id and g.logprob == pytest.approx(w.logprob, abs=1e-5)
            assert [t for t, _ in g.top] == [t for t, _ in w.top]
            assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=1e-5)


def test_repetition_penalty_changes_the_greedy_choice_as_on_the_cpu() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11] = 2.0, 1.5
    r = req("a", [10], repetition_penalty=2.0)  # 2.0 / 2 = 1.0 < 1.5
    assert GpuSampler("cpu")(logits.clone(), [r]).token_ids == Sampler()(logits.clone(), [r]).token_ids == [11]


def test_frequency_and_presence_penalties_subtract_per_output_occurrence() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 7], logits[0, 9] = 3.0, 2.2, 0.6
    # 5 appears twice in the output: 3 - 2*1.0 - 0.5 = 0.5; 7 once: 2.2 - 1.0 - 0.5 = 0.7; 9 never.
    r = req("a", [9, 9], [5, 5, 7], frequency_penalty=1.0, presence_penalty=0.5, logprobs=0)
    out = GpuSampler("cpu")(logits.clone(), [r])
    assert out.token_ids == [9 if 0.6 > 0.7 else 7]
    penalised = logits.clone()
    penalised[0, 5], penalised[0, 7] = 0.5, 0.7
    assert out.logprobs[0] is not None
    assert out.logprobs[0].logprob == pytest.approx(float(torch.log_softmax(penalised, -1)[0, 7]), abs=1e-5)


def draws(sampler: GpuSampler, logits: torch.Tensor, requests: list[Request], steps: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in requests]
    for _ in range(steps):
        for i, t in enumerate(sampler(logits.clone(), requests).token_ids):
            out[i].append(t)
    return out


def test_a_seeded_request_draws_the_same_tokens_whatever_shares_its_batch() -> None:
    logits = logits_for(1, seed=1)
    alone = draws(GpuSampler("cpu"), logits, [req("a", temperature=1.0, seed=42)], 20)[0]
    crowd = [req("x", temperature=1.0), req("y", temperature=0.7, seed=1), req("z"), req("a", temperature=1.0, seed=42)]
    in_crowd = draws(GpuSampler("cpu", seed=123), torch.cat([logits_for(3, seed=2), logits]), crowd, 20)[3]
    assert alone == in_crowd
    assert draws(GpuSampler("cpu"), logits, [req("a", temperature=1.0, seed=43)], 20)[0] != alone


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.6), (8, 0.5)])
def test_sampled_frequencies_follow_the_filtered_distribution(top_k: int, top_p: float) -> None:
    row = logits_for(1, seed=3)[0] / 2
    n = 4000
    requests = [req(str(i), temperature=0.8, top_k=top_k, top_p=top_p) for i in range(n)]
    tokens = torch.tensor(GpuSampler("cpu", seed=5)(row.expand(n, VOCAB).clone(), requests).token_ids)
    # The distribution the CPU sampler draws from, written out directly: the top k renormalised,
    # then the smallest prefix of them whose mass reaches top_p.
    probs = torch.softmax(row / 0.8, -1)
    order = probs.argsort(descending=True)[:top_k or VOCAB]
    probs_k = probs[order] / probs[order].sum()
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    mass = 0.0
    for t, pk in zip(order.tolist(), probs_k.tolist(), strict=True):
        if mass >= top_p:
            break
        keep[t] = True
        mass += pk
    want = torch.where(keep, probs, 0.0)
    want /= want.sum()
    seen = torch.bincount(tokens, minlength=VOCAB).float() / n
    assert set(tokens.tolist()) <= set(keep.nonzero().flatten().tolist())
    assert (seen - want).abs().max() < 0.03


def test_structured_requests_go_to_the_cpu_sampler() -> None:
    sampler = GpuSampler("cpu")
    seen: list[int] = []

    class Host(Sampler):
        def __call__(self, logits: torch.Tensor, requests):  # type: ignore[no-untyped-def, override]
            seen.append(len(requests))
            return super().__call__(logits, requests)

    sampler.host = Host()
    r = req("a")
    object.__setattr__(r.params, "structured", object())
    out = sampler(logits_for(2), [r, req("b")])
    assert seen == [2] and len(out.token_ids) == 2


def test_the_device_picks_the_sampler() -> None:
    assert type(make_sampler("cpu")) is Sampler
    assert isinstance(make_sampler("meta"), Sampler)


@pytest.mark.gpu
def test_one_host_sync_per_step_on_cuda() -> None:
    requests = [req("a", temperature=0.9, top_k=5, seed=3, logprobs=2), req("b", [4, 4], [6], repetition_penalty=1.3),
                req("c", temperature=1.1, top_p=0.7, frequency_penalty=0.5)]
    sampler = make_sampler("cuda")
    assert isinstance(sampler, GpuSampler)
    logits = logits_for(3).cuda()
    sampler(logits, requests)  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sampler(logits, requests)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    assert out.token_ids[1] == Sampler()(logits.cpu(), requests[1:2]).token_ids[0]
