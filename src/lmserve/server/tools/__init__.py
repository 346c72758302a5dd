"""Tool calling in chat completions: the request's tools and choice (``spec``), the conversation
through the chat template (``render``), the calls out of the answer (``parsers``), and what a
request's tool fields mean for its prompt, sampling and answer (``plan``)."""

from lmserve.server.tools.parsers import ToolCall, ToolParser, ToolStream, parser_for
from lmserve.server.tools.plan import ToolPlan, plan_tools

__all__ = ["ToolCall", "ToolParser", "ToolPlan", "ToolStream", "parser_for", "plan_tools"]
