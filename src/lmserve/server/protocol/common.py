"""Pieces the dialects share: strict models and bounded integers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Unknown fields are errors that name the field; no silent type coercion; no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# Integers are bounded so that no value can overflow on its way to the engine.
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
TopN = Annotated[int, Field(ge=0, le=20)]
