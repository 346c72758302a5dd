"""Every dialect's structured-output fields into one ``StructuredOutputs``, checked before any engine
sees it: two constraints at once are a 400 naming both fields, a malformed schema, regex or grammar
a 400 naming the field and the problem."""

from __future__ import annotations

import json
from typing import Any

from lmserve.engine.structured.grammar import check_structured
from lmserve.engine.structured_spec import StructuredOutputs
from lmserve.errors import InvalidRequestError
from lmserve.server.protocol.common import GuidedFields
from lmserve.server.protocol.lmi import GenerationParameters
from lmserve.server.protocol.openai import ResponseFormat

Candidate = tuple[str, StructuredOutputs]


def openai_structured(fields: GuidedFields, response_format: ResponseFormat | None) -> StructuredOutputs | None:
    """``response_format`` and the vLLM extras of an OpenAI request."""
    found = _guided(fields, prefix="")
    if response_format is not None and response_format.type == "json_object":
        found.insert(0, _candidate("response_format", json_object=True))
    elif response_format is not None and response_format.type == "json_schema":
        js = response_format.json_schema
        if js is None or js.schema_ is None:
            raise InvalidRequestError("response_format.json_schema.schema",
                                      "is required when response_format.type is 'json_schema'")
        found.insert(0, _candidate("response_format.json_schema.schema", json=json.dumps(js.schema_)))
    return _one(found)


def lmi_structured(p: GenerationParameters) -> StructuredOutputs | None:
    """TGI's ``grammar`` and the vLLM extras inside LMI/TGI ``parameters``."""
    found = _guided(p, prefix="parameters.")
    if p.grammar is not None:
        field = "parameters.grammar.value"
        if p.grammar.type == "regex":
            if not isinstance(p.grammar.value, str):
                raise InvalidRequestError(field, "must be a string (a regular expression) for type 'regex'")
            found.insert(0, _candidate(field, regex=p.grammar.value))
        else:
            found.insert(0, _candidate(field, json=_json_text(p.grammar.value)))
    return _one(found)


def _guided(f: GuidedFields, prefix: str) -> list[Candidate]:
    found: list[Candidate] = []
    if f.guided_json is not None:
        found.append(_candidate(prefix + "guided_json", json=_json_text(f.guided_json)))
    if f.guided_regex is not None:
        found.append(_candidate(prefix + "guided_regex", regex=f.guided_regex))
    if f.guided_choice is not None:
        found.append(_candidate(prefix + "guided_choice", choice=tuple(f.guided_choice)))
    if f.guided_grammar is not None:
        found.append(_candidate(prefix + "guided_grammar", grammar=f.guided_grammar))
    so = f.structured_outputs
    if so is not None:
        given = {"json": None if so.json_ is None else _json_text(so.json_), "json_object": bool(so.json_object),
                 "regex": so.regex, "choice": None if so.choice is None else tuple(so.choice),
                 "grammar": so.grammar}  # fmt: skip
        found.append(_candidate(prefix + "structured_outputs", **given))
    return found


def _candidate(field: str, **kinds: Any) -> Candidate:
    try:
        spec = StructuredOutputs(**kinds)
    except InvalidRequestError as exc:
        # structured_outputs.choice names the sub-field; guided_choice is already the field
        sub = exc.field.removeprefix("structured_outputs") if field.endswith("structured_outputs") else ""
        raise InvalidRequestError(field + sub, exc.message) from None
    if spec.kind in ("regex", "grammar") and not getattr(spec, spec.kind):
        raise InvalidRequestError(field, "must not be empty")
    return field, spec


def _one(found: list[Candidate]) -> StructuredOutputs | None:
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidRequestError(found[1][0], f"conflicts with {found[0][0]}: give one structured-output "
                                                f"constraint, not several ({names})")
    field, spec = found[0]
    check_structured(spec, field)
    return spec


def _json_text(value: str | dict[str, Any]) -> str:
    return value if isinstance(value, str) else json.dumps(value)


__all__ = ["lmi_structured", "openai_structured"]
