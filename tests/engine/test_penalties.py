"""OpenAI's presence/frequency penalties, logit bias and the min_tokens ban, against hand-computed logits."""

from __future__ import annotations

import pytest
import torch

from lmserve.engine.penalties import apply_penalties
from lmserve.engine.prompt_limits import check_logit_bias
from lmserve.engine.request import Request
from lmserve.engine.sampler import Sampler
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.structured_spec import StructuredOutputs
from lmserve.errors import InvalidRequestError


def req(output: list[int], prompt: list[int] | None = None, **params: object) -> Request:
    r = Request("r", prompt or [0, 1], SamplingParams(**params))  # type: ignore[arg-type]
    r.output_token_ids.extend(output)
    return r


def test_presence_and_frequency_count_generated_tokens_only() -> None:
    logits = torch.zeros(2, 5)
    # Token 1 generated twice, token 3 once; token 4 is in the prompt only, so it is not penalized.
    penalized = req([1, 3, 1], prompt=[4, 4], presence_penalty=0.5, frequency_penalty=0.25)
    plain = req([1, 1, 1])
    apply_penalties(logits, [penalized, plain])
    expected = [0.0, -(0.5 + 2 * 0.25), 0.0, -(0.5 + 0.25), 0.0]
    assert logits[0].tolist() == pytest.approx(expected)
    assert logits[1].tolist() == [0.0] * 5  # a neighbour without penalties is untouched


def test_negative_penalties_encourage_repeats() -> None:
    logits = torch.zeros(1, 3)
    apply_penalties(logits, [req([2, 2], presence_penalty=-1.0, frequency_penalty=-0.5)])
    assert logits[0].tolist() == pytest.approx([0.0, 0.0, 2.0])


def test_logit_bias_adds_to_named_tokens_and_can_force_or_ban_a_token() -> None:
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.0], [1.0, 5.0, 2.0, 0.0]])
    apply_penalties(logits, [req([], logit_bias={0: 3.5, 1: -100}), req([])])
    assert logits[0].tolist() == pytest.approx([4.5, -95.0, 2.0, 0.0])
    assert logits[1].tolist() == pytest.approx([1.0, 5.0, 2.0, 0.0])
    forced = Sampler()(torch.tensor([[1.0, 5.0, 2.0, 0.0]]), [req([], logit_bias={3: 100})])
    assert forced.token_ids == [3]


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached() -> None:
    logits = torch.tensor([[9.0, 1.0, 8.0, 0.0]] * 3)
    early = req([5], min_new_tokens=2, stop_token_ids=[2])
    done = req([5, 5], min_new_tokens=2, stop_token_ids=[2])
    ignoring = req([5], min_new_tokens=2, ignore_eos=True)
    constrained = req([5], min_new_tokens=2, structured=StructuredOutputs(json_object=True))
    out = Sampler(eos_token_ids=[0])(torch.cat([logits, logits[:1]]), [early, done, ignoring, constrained]).token_ids
    # eos (0) and the stop token (2) are banned for the early row only; a grammar decides for itself
    assert out == [1, 0, 0, 0]


def test_penalties_change_what_a_greedy_row_picks() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    assert Sampler()(logits.clone(), [req([0, 0], frequency_penalty=0.3)]).token_ids == [1]
    assert Sampler()(logits.clone(), [req([0, 0], frequency_penalty=0.2)]).token_ids == [0]


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("logit_bias", {1: 101}), ("logit_bias", {-1: 1.0}),
])  # fmt: skip
def test_out_of_range_values_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert err.value.field == field


def test_logit_bias_ids_are_checked_against_the_vocabulary() -> None:
    check_logit_bias(SamplingParams(logit_bias={9: 1.0}), 10)
    with pytest.raises(InvalidRequestError, match=r"token id 10 is outside the vocabulary.*\[0, 10\)"):
        check_logit_bias(SamplingParams(logit_bias={10: 1.0}), 10)
