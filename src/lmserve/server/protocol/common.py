"""Pieces the dialects share: strict models and bounded integers."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Unknown fields are errors that name the field; no silent type coercion; no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# Integers are bounded so that no value can overflow on its way to the engine.
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
TopN = Annotated[int, Field(ge=0, le=20)]


class StructuredOutputsParam(StrictModel):
    """vLLM's ``structured_outputs``: exactly one constraint (checked when translated)."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class GuidedFields(StrictModel):
    """vLLM's older structured-output extras, accepted by the OpenAI routes and in LMI parameters."""

    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParam | None = None
