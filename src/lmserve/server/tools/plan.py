"""What a chat request's tool fields mean for its prompt, its sampling and its answer."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.structured_spec import StructuredOutputs
from lmserve.errors import InvalidRequestError
from lmserve.server.protocol.openai import ChatCompletionRequest
from lmserve.server.runtime import ModelRuntime
from lmserve.server.tools.parsers import NamedParser, RequiredParser, ToolParser, parser_for
from lmserve.server.tools.render import template_knows_tools, template_messages
from lmserve.server.tools.spec import constraint, parse_tool_choice, parse_tools

AUTO_OFF = ("auto tool choice is not enabled on this server (its operator enables it with "
            "option.enable_auto_tool_choice=true or --enable-auto-tool-choice); tool_choice 'required', "
            "'none' or a named function work without it")  # fmt: skip


@dataclass(frozen=True)
class ToolPlan:
    """``messages`` and ``template_vars`` for the chat template; ``structured``, the constraint that
    enforces the choice; ``parser``, how to find the calls in the answer (None: no calls)."""

    messages: list[dict[str, Any]]
    template_vars: dict[str, Any] = field(default_factory=dict)
    structured: StructuredOutputs | None = None
    parser: ToolParser | None = None
    eos_texts: tuple[str, ...] = ()  # the end-of-sequence token as text, when special tokens are kept

    def apply(self, params: SamplingParams) -> SamplingParams:
        """``params`` with what the plan needs of the engine."""
        if self.structured is not None and params.structured is not None:
            raise InvalidRequestError("tool_choice", "a required or named tool choice cannot be combined with "
                                                     "another output constraint (response_format)")  # fmt: skip
        if self.structured is not None:
            params = params.replace(structured=self.structured)
        if self.parser is not None and self.parser.needs_special_tokens:
            # The call marker is a special token: keep special tokens in the text, but not the
            # end-of-sequence token's text (as a stop string, it is cut off).
            params = params.replace(skip_special_tokens=False, stop=(*params.stop, *self.eos_texts))
        return params


def plan_tools(rt: ModelRuntime, body: ChatCompletionRequest) -> ToolPlan:
    """Check the request's tool fields and work out what they mean for this model."""
    assert rt.tokenizer is not None, "plan_tools() is called only when the model is ready"
    tools = parse_tools(body.tools)
    choice = parse_tool_choice(body.tool_choice, tools)
    family = parser_for(rt.config.model.tool_call_parser, _model_type(str(rt.tokenizer.model_dir)))
    native = template_knows_tools(getattr(rt.tokenizer.hf, "chat_template", None))
    shown = tools if choice.mode != "none" else []
    messages, template_vars = template_messages(body.messages, shown, family, native)
    if choice.mode == "auto" and not rt.config.model.enable_auto_tool_choice:
        raise InvalidRequestError("tool_choice", AUTO_OFF)
    parser: ToolParser | None = {"none": None, "auto": family, "required": RequiredParser(),
                                 "named": NamedParser(choice.name or "")}[choice.mode]  # fmt: skip
    structured = constraint(tools, choice, body.parallel_tool_calls is not False)
    eos = getattr(rt.tokenizer.hf, "eos_token", None)
    return ToolPlan(messages, template_vars, structured, parser, (eos,) if isinstance(eos, str) and eos else ())


@functools.lru_cache(maxsize=64)
def _model_type(model_dir: str) -> str | None:
    """The checkpoint's ``model_type`` (config.json), which picks the tool-call format of its family."""
    try:
        value = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None
