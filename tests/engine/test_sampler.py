"""Token choice: greedy, filters, seeds, repetition penalty and log-probabilities."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lmserve.engine.request import Request
from lmserve.engine.sampler import Sampler
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import InvalidRequestError


def req(rid: str, tokens: list[int] | None = None, **params) -> Request:
    return Request(rid, tokens or [1, 2, 3], SamplingParams(**params))


def draws(sampler: Sampler, logits: torch.Tensor, requests: list[Request], steps: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in requests]
    for _ in range(steps):
        for i, t in enumerate(sampler(logits.clone(), requests).token_ids):
            out[i].append(t)
    return out


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert Sampler()(logits, [req("a"), req("b")]).token_ids == [1, 0]


def test_same_seed_same_tokens_whatever_shares_the_batch() -> None:
    logits = torch.randn(1, 50)
    alone = draws(Sampler(), logits, [req("a", temperature=1.0, seed=42)], 20)[0]
    crowd_logits = torch.cat([torch.randn(3, 50), logits])
    crowd = [req("x", temperature=1.0), req("y", temperature=0.7, seed=1), req("z"),
             req("a", temperature=1.0, seed=42)]
    in_crowd = draws(Sampler(seed=123), crowd_logits, crowd, 20)[3]
    assert alone == in_crowd
    other_seed = draws(Sampler(), logits, [req("a", temperature=1.0, seed=43)], 20)[0]
    assert other_seed != alone


def test_top_k_one_is_greedy_and_top_k_limits_choices() -> None:
    logits = torch.randn(1, 100)
    assert set(draws(Sampler(), logits, [req("a", temperature=1.0, top_k=1, seed=0)], 10)[0]) == {
        int(logits.argmax())}
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(draws(Sampler(), logits, [req("a", temperature=5.0, top_k=3, seed=0)], 50)[0]) <= allowed


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = set(draws(Sampler(), probs.log(), [req("a", temperature=1.0, top_p=0.7, seed=0)], 200)[0])
    assert seen == {0, 1}


def test_draws_follow_the_distribution_at_its_temperature() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = (probs.log() * 0.5).unsqueeze(0)  # at temperature 0.5 these are probs again
    tokens = draws(Sampler(), logits, [req("a", temperature=0.5, seed=7)], 4000)[0]
    freq = torch.bincount(torch.tensor(tokens), minlength=5).double() / len(tokens)
    assert torch.allclose(freq, probs.double(), atol=0.025), freq


def top_p_set(probs: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p, by a full sort."""
    values, indices = probs.sort(descending=True)
    size = int(((values.cumsum(0) - values) < top_p).sum())
    return set(indices[:size].tolist())


def long_tail(generator: torch.Generator) -> torch.Tensor:
    """Ten likely tokens and 30,000 each far below 1/1024 of them, holding most of the mass together."""
    logits = torch.randn(1, 30010, generator=generator) * 0.1 - 8.0
    logits[0, :10] = 0.0
    return logits


@pytest.mark.parametrize("shape, sorts_all", [
    (lambda g: torch.randn(1, 4000, generator=g) * 8.0, False),  # peaked: among the likely tokens
    (lambda g: torch.randn(1, 4000, generator=g) * 0.3, False),  # flat, but a small vocabulary
    (lambda g: torch.randn(1, 8000, generator=g) * 0.3, True),  # flat over more candidates than sorted
    (long_tail, True),  # the likely tokens do not hold the mass
], ids=["peaked", "flat-small", "flat-large", "long-tail"])
def test_top_p_over_a_large_vocabulary_keeps_exactly_the_smallest_set(
        shape: Callable[[torch.Generator], torch.Tensor], sorts_all: bool, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import lmserve.engine.sampler as sampler_module

    logits = shape(torch.Generator().manual_seed(3))
    expected = top_p_set(torch.softmax(logits[0], -1), 0.6)
    sorted_all = []
    real = sampler_module._draw_sorted
    monkeypatch.setattr(sampler_module, "_draw_sorted", lambda *a: sorted_all.append(1) or real(*a))
    seen = set(draws(Sampler(), logits, [req("a", temperature=1.0, top_p=0.6, seed=0)], 400)[0])
    assert seen <= expected
    assert len(seen) >= min(len(expected), 100) * 0.5  # the draws spread over the set, not one token
    assert bool(sorted_all) == sorts_all  # each path of the sampler is exercised


def test_batched_unfiltered_rows_draw_from_their_own_distributions() -> None:
    logits = torch.full((3, 300), -30.0)
    logits[0, 7], logits[1, 42], logits[2, 5], logits[2, 6] = 0.0, 0.0, 0.0, 0.0
    seen = draws(Sampler(), logits, [req("a", temperature=1.0), req("b", temperature=0.8), req("c", temperature=1.0)], 50)
    assert set(seen[0]) == {7} and set(seen[1]) == {42} and set(seen[2]) == {5, 6}


def test_repetition_penalty_matches_hugging_face() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 20)
    history = [3, 7, 7, 11]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits.clone())
    ours = logits.clone()
    Sampler()(ours, [req("a", tokens=history, repetition_penalty=1.3)])
    assert torch.allclose(ours, expected)


def test_logprobs_are_log_softmax_with_sorted_alternatives() -> None:
    logits = torch.randn(2, 30)
    result = Sampler()(logits.clone(), [req("a", logprobs=3), req("b")])
    lp = torch.log_softmax(logits[0], -1)
    entry = result.logprobs[0]
    assert entry is not None and entry.token_id == result.token_ids[0]
    assert entry.logprob == pytest.approx(float(lp[entry.token_id]), abs=1e-5)
    assert [t for t, _ in entry.top] == lp.topk(3).indices.tolist()
    assert result.logprobs[1] is None


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0),
                                 dict(logprobs=99), dict(repetition_penalty=0), dict(stop=[""]), dict(seed="x")])
def test_invalid_params_name_the_field(bad: dict) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**bad)
    assert err.value.field == next(iter(bad))


def test_the_sorted_draw_gives_each_rank_its_mass_and_ties_their_share() -> None:
    """The flat path draws a rank among the values sorted alone, then finds the token of that value:
    among equal values the k-th rank is the k-th such token in vocabulary order, so tied tokens
    share the tie's mass evenly, and a set cut inside a tie keeps the first of them."""
    from lmserve.engine.sampler import _draw_sorted

    row = np.array([1.0, 4.0, 1.0, 1.0, 1.0], dtype=np.float32)  # total 8
    grid = [(k + 0.5) / 800 for k in range(800)]
    everything = Counter(_draw_sorted(row, 7.9, u) for u in grid)  # all five: 4 then four ranks of 1
    assert everything == {1: 400, 0: 100, 2: 100, 3: 100, 4: 100}
    cut = Counter(_draw_sorted(row, 4.8, u) for u in grid)  # 4 + one tied 1 reach 4.8 of 8
    assert cut == {1: 640, 0: 160}
