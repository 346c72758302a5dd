"""OpenAI completion and chat completion request bodies.

Fields OpenAI defines but lmserve cannot honour are accepted only at their neutral values and
refused by name otherwise (see ``lmserve.server.params``). ``top_k``, ``repetition_penalty``,
``ignore_eos``, ``min_tokens`` and ``stop_token_ids`` are extensions, as in other open servers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lmserve.server.protocol.common import Count, GuidedFields, Seed, StrictModel, TopN


class StreamOptions(StrictModel):
    include_usage: bool = False
    # vLLM's extension: every chunk carries the usage so far (load testers read it per chunk).
    continuous_usage_stats: bool = False


class JsonSchemaFormat(StrictModel):
    """``response_format.json_schema``: OpenAI's structured outputs."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(GuidedFields):
    model: str | None = Field(default=None, description="The served model's name; any other is a 404.")
    max_tokens: Count | None = None
    temperature: float | None = Field(default=None, description="Default 1.0.")
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: Count | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: Count | None = None
    stop_token_ids: list[Count] | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``max_tokens`` defaults to 16, as in OpenAI's API."""

    prompt: str | list[str] | list[Count] | list[list[Count]]
    logprobs: TopN | None = None
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=16)
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # as vLLM: structured output on completions too


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(StrictModel):
    """A call an earlier assistant turn made, sent back with the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``. Without ``max_tokens`` the answer may fill the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: TopN | None = None
    max_completion_tokens: Count | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class EmbeddingRequest(StrictModel):
    """``POST /v1/embeddings``. Token-id inputs are refused by name (lmserve embeds text)."""

    model: str | None = Field(default=None, description="The served model's name; any other is a 404.")
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
