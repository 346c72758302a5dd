"""Tool calling in chat completions: the request's tools and choice (``spec``), the conversation
through the chat template (``render``), the calls out of the answer (``parsers``), streamed
(``stream``), and what a request's tool fields mean for its prompt, sampling and answer (``plan``)."""

from lmserve.server.tools.parsers import ToolCall, ToolParser, parser_for
from lmserve.server.tools.plan import ToolPlan, plan_tools
from lmserve.server.tools.stream import ToolStream

__all__ = ["ToolCall", "ToolParser", "ToolPlan", "ToolStream", "parser_for", "plan_tools"]
