"""SageMaker/DJL LMI and TGI request bodies; both dialects share one parameter set."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lmserve.server.protocol.common import Count, GuidedFields, Seed, StrictModel, TopN


class TGIGrammar(StrictModel):
    """TGI's ``grammar`` parameter: a JSON schema (object or text) or a regular expression."""

    type: Literal["json", "json_schema", "regex"]
    value: str | dict[str, Any]


class GenerationParameters(GuidedFields):
    """LMI/TGI generation parameters. Unset ones take the dialect's defaults.

    ``do_sample=false`` decodes greedily whatever ``temperature`` says; ``do_sample=true`` samples at
    ``temperature`` (1.0 when unset); unset ``do_sample`` samples only when a ``temperature`` above 0
    is given. ``stop`` (TGI) and ``stop_sequences`` (LMI) are merged. Structured output: TGI's
    ``grammar`` (``{"type": "json" | "regex", "value": ...}``) or vLLM's ``guided_*`` extras.
    """

    max_new_tokens: Count | None = None
    min_new_tokens: Count | None = None
    temperature: float | None = None
    top_k: Count | None = None
    top_p: float | None = None
    do_sample: bool | None = None
    repetition_penalty: float | None = None
    stop_sequences: list[str] | None = None
    stop: list[str] | str | None = None
    seed: Seed | None = None
    details: bool = False
    return_full_text: bool = False
    ignore_eos: bool = False
    decoder_input_details: bool = Field(default=False, description="Prompt log-probabilities; not supported.")
    top_n_tokens: TopN | None = None
    truncate: Count | None = Field(default=None, description="Keep only the last this many prompt tokens.")
    # TGI parameters accepted only at their neutral value; anything else is refused by name.
    best_of: Count | None = None
    typical_p: float | None = None
    watermark: bool = False
    frequency_penalty: float | None = None
    grammar: TGIGrammar | None = None
    adapter_id: str | None = None


class InvocationRequest(StrictModel):
    """``POST /invocations`` and ``POST /predictions/{model}``."""

    inputs: str | list[str]
    parameters: GenerationParameters = Field(default_factory=lambda: GenerationParameters())
    stream: bool = False


class GenerateRequest(StrictModel):
    """TGI ``POST /generate`` and ``POST /generate_stream``."""

    inputs: str
    parameters: GenerationParameters = Field(default_factory=lambda: GenerationParameters())


class CompatGenerateRequest(GenerateRequest):
    """TGI ``POST /``: streams when ``stream`` is true, else answers like ``/generate``."""

    stream: bool = False
