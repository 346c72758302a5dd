"""A ``StructuredOutputs`` as an llguidance grammar, and the check a frontend runs before sending it.

Torch-free and tokenizer-free, so the HTTP frontend can refuse a bad schema with a 400 that names
the problem before any engine sees it. The engine compiles the same grammar text against the
model's tokenizer (``manager.py``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from lmserve.engine.structured_spec import StructuredOutputs
from lmserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# What any-JSON means for ``json_object``: OpenAI's JSON mode asks for an object, not any value.
_ANY_OBJECT = '{"type": "object"}'
# JSON is written on one line with json.dumps's separators: free whitespace lets a small model spend
# its whole budget on newlines. A schema may override this with llguidance's "x-guidance" options.
_JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutputs, field: str = "structured_outputs") -> str:
    """The llguidance grammar for ``spec``. Raises ``InvalidRequestError`` naming ``field`` when the
    constraint cannot even be translated (malformed JSON, a grammar that is neither GBNF nor Lark)."""
    if spec.json is not None:
        return llguidance.LLMatcher.grammar_from_json_schema(_schema(spec.json, field), _JSON_OPTIONS)
    if spec.json_object:
        return llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, _JSON_OPTIONS)
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        alternatives = " | ".join(json.dumps(c) for c in spec.choice)  # Lark strings use JSON escapes
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    assert spec.grammar is not None  # StructuredOutputs guarantees exactly one kind
    try:
        lark = any_to_lark(spec.grammar)
    except Exception as exc:  # the converter raises plain exceptions with a position in the text
        raise InvalidRequestError(field, f"is neither a Lark nor a GBNF grammar: {exc}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


def check_structured(spec: StructuredOutputs, field: str = "structured_outputs") -> None:
    """Refuse a constraint that cannot be compiled, with a message naming ``field`` and the problem.

    A JSON schema is checked against its JSON Schema meta-schema first (its messages say which
    keyword is wrong), then every kind is compiled once without a tokenizer, which catches what
    the meta-schema allows but the compiler does not support, bad regexes and bad grammars.
    """
    if spec.json is not None:
        _check_meta_schema(json.loads(_schema(spec.json, field)), field)
    error = llguidance.LLMatcher.validate_grammar(grammar_text(spec, field))
    if error:
        raise InvalidRequestError(field, f"cannot be compiled: {error}")


def _schema(text: str, field: str) -> str:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(field, f"is not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError(field, f"must be a JSON object (a JSON schema), got {type(schema).__name__}")
    return text


def _check_meta_schema(schema: Any, field: str) -> None:
    import jsonschema  # only the frontend's check needs it

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise InvalidRequestError(field, f"is not a valid JSON schema at {where}: {exc.message}") from None


__all__ = ["check_structured", "grammar_text"]
