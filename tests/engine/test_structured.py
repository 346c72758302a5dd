"""Constrained decoding on the default model: outputs obey their schema, regex, choice or grammar,
and an unconstrained neighbour's tokens do not change."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from lmserve import LLM, SamplingParams
from lmserve.engine.structured_spec import StructuredOutputs

pytestmark = [pytest.mark.default_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def llm(default_model_dir: Path) -> LLM:
    return LLM(str(default_model_dir), dtype="bf16", max_model_len=512, max_num_seqs=64)


def _chat(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.chat_prompt_ids([{"role": "user", "content": text}])


_WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tea", "rock", "jazz"]


def _schema(i: int) -> dict[str, Any]:
    """Fifty varied schemas whose valid instances are short: nested objects, enums, arrays, required
    fields, integers and numbers with bounds."""
    enum = _WORDS[i % 10: i % 10 + 3] or ["x"]
    low, high = i, i + 5 + i % 7
    shapes: list[dict[str, Any]] = [
        {"type": "object", "properties": {"color": {"enum": enum}, "count": {"type": "integer", "minimum": low,
                                                                            "maximum": high}},
         "required": ["color", "count"], "additionalProperties": False},
        {"type": "object", "properties": {"point": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": -high, "maximum": high},
            "y": {"type": "integer", "minimum": 0, "maximum": low + 1}},
            "required": ["x", "y"], "additionalProperties": False}},
         "required": ["point"], "additionalProperties": False},
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": enum},
                                                   "minItems": 1, "maxItems": 1 + i % 3}},
         "required": ["tags"], "additionalProperties": False},
        {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {
            "type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}},
         "required": ["ok", "score"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                          "level": {"enum": [low, high]},
                                          "meta": {"type": "object", "properties": {"on": {"type": "boolean"}},
                                                   "required": ["on"], "additionalProperties": False}},
         "required": ["name", "level", "meta"], "additionalProperties": False},
    ]
    return shapes[i % len(shapes)]


def test_fifty_json_schemas_all_validate_in_one_batch(llm: LLM) -> None:
    schemas = [_schema(i) for i in range(50)]
    prompts = [_chat(llm, f"Reply with JSON for item {i}.") for i in range(50)]
    params = [SamplingParams(max_new_tokens=32, structured=StructuredOutputs(json=json.dumps(s))) for s in schemas]
    outs = llm.generate(prompts, params)
    for schema, out in zip(schemas, outs, strict=True):
        assert out.finish_reason == "stop", out.text  # the grammar ended the answer, not the token limit
        jsonschema.validate(json.loads(out.text), schema)


def test_regex_choice_grammar_and_json_object(llm: LLM) -> None:
    cases = [
        (StructuredOutputs(regex=r"\d{3}-\d{4}"), "Make up a phone number."),
        (StructuredOutputs(choice=("yes", "no", "maybe")), "Is the sky green?"),
        (StructuredOutputs(grammar='root ::= "The sky is " color "."\ncolor ::= "red" | "blue"'), "Sky colour?"),
        (StructuredOutputs(grammar='start: "A" "-" NUM\nNUM: /[0-9]{2}/'), "A code, please."),  # Lark
        (StructuredOutputs(json_object=True), "A JSON object with a cat's name only."),
    ]
    outs = llm.generate([_chat(llm, q) for _, q in cases],
                        [SamplingParams(max_new_tokens=24, structured=s) for s, _ in cases])
    phone, choice, sky, code, obj = (o.text for o in outs)
    assert re.fullmatch(r"\d{3}-\d{4}", phone)
    assert choice in ("yes", "no", "maybe")
    assert sky in ("The sky is red.", "The sky is blue.")
    assert re.fullmatch(r"A-[0-9]{2}", code)
    assert all(o.finish_reason == "stop" for o in outs[:4])
    if outs[4].finish_reason == "stop":
        assert isinstance(json.loads(obj), dict)
    else:
        assert obj.startswith("{")


def test_unconstrained_tokens_unchanged_by_constrained_neighbours(llm: LLM) -> None:
    plain = _chat(llm, "Name three fruits.")
    greedy = SamplingParams(max_new_tokens=12)
    (alone,) = llm.generate([plain], greedy)
    neighbours = [SamplingParams(max_new_tokens=12, structured=StructuredOutputs(json=json.dumps(_schema(i))))
                  for i in range(3)]
    mixed = llm.generate([plain, plain, plain, plain], [neighbours[0], greedy, neighbours[1], neighbours[2]])
    assert mixed[1].token_ids == alone.token_ids
    assert mixed[0].token_ids != alone.token_ids  # the neighbours really were constrained


def test_a_grammar_the_engine_cannot_compile_fails_that_request_alone_and_says_why(llm: LLM) -> None:
    # The server refuses this before it reaches an engine; the engine must still fail it cleanly.
    bad, good = llm.generate([_chat(llm, "Hi")] * 2, [
        SamplingParams(max_new_tokens=4, structured=StructuredOutputs(regex="(unclosed")),
        SamplingParams(max_new_tokens=4)])
    assert bad.finish_reason == "error"
    assert bad.error_kind == "invalid_request" and bad.error_field == "structured_outputs"
    assert bad.error and "cannot be compiled" in bad.error  # says why it has no output
    assert good.finish_reason == "length" and len(good.token_ids) == 4 and good.error is None


def test_a_preempted_constrained_request_continues_its_grammar(llm: LLM) -> None:
    # Preemption frees the request's KV blocks and recomputes them later; its output, and so its
    # grammar state, must carry on where it was: same tokens as a run never preempted (greedy).
    prompt = llm.tokenizer.encode("Point as JSON:")
    params = SamplingParams(max_new_tokens=24, structured=StructuredOutputs(json=json.dumps(_schema(1))))
    (expected,) = llm.generate([prompt], params)
    engine = llm.engine
    engine.add_request("preempted", prompt, params)
    request = engine._live["preempted"].request
    tokens: list[int] = []
    preempted = False
    while engine.has_unfinished_requests():
        if not preempted and request.num_output_tokens >= 3:
            engine.scheduler.running.remove(request)
            engine.scheduler._preempt(request)
            preempted = True
        for delta in engine.step():
            tokens += delta.token_ids
    assert preempted and request.num_preemptions == 1
    assert tokens == expected.token_ids
    jsonschema.validate(json.loads(expected.text), _schema(1))
