"""Value types of configuration keys: how a raw value (text from a file or the environment, or a
typed value from code) becomes the typed value a dataclass field holds.

A ``ValueType`` pairs a parser with the sentence that says what is allowed; the loader wraps the
parser's ``ValueError`` into a ``ConfigError`` that names key, value, source and that sentence.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# option.tensor_parallel_degree=max is kept as this sentinel; the launcher resolves it to the number
# of devices it can see. Any real degree is >= 1, so it cannot be mistaken for one.
TENSOR_PARALLEL_MAX = -1

DEFAULT_ENTRY_POINT = "lmserve.default"

# LMI's built-in text-generation handlers; lmserve serves all of them with its default handler.
LMI_ENTRY_POINTS = (
    "djl_python.lmi_vllm.vllm_async_service",  # LMI's recommended vLLM setup (with async_mode)
    "djl_python.lmi_trtllm.trtllm_async_service",
    "djl_python.transformers_neuronx",
    "djl_python.transformers-neuronx",
    "djl_python.transformersneuronx",
    "djl_python.huggingface",
    "djl_python.lmi_dist",
    "djl_python.vllm",
    "djl_python.deepspeed",
    "djl_python.tensorrt_llm",
)

# option.task spellings -> the default handler that serves the task.
TASKS = {"text-generation": "text-generation", "text_generation": "text-generation",
         "text-embedding": "text-embedding", "text_embedding": "text-embedding", "embedding": "text-embedding",
         "feature-extraction": "text-embedding", "feature_extraction": "text-embedding",
         "text-classification": "text-classification", "text_classification": "text-classification",
         "sentiment-analysis": "text-classification"}  # fmt: skip

# LMI rolling-batch backends: all mean "continuous batching", which lmserve does itself.
LMI_ROLLING_BATCH = ("lmi-dist", "lmi-dist-v2", "vllm", "scheduler", "trtllm", "deepspeed", "tnx")

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class ValueType:
    """How to read one key's value. ``parse`` raises ``ValueError`` when the value is not allowed."""

    name: str  # short type name for the key reference, e.g. "int", "bool"
    allowed: str  # what is allowed, in words, for error messages and docs
    parse: Callable[[object], object]


def _text(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected text, got {type(raw).__name__}")
    return raw.strip()


def _to_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = _text(raw).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(text)


def _to_int(raw: object) -> int:
    if isinstance(raw, bool):  # bool is an int subclass; True is not a batch size
        raise ValueError(raw)
    if isinstance(raw, int):
        return raw
    return int(_text(raw), 10)


def _to_float(raw: object) -> float:
    if isinstance(raw, bool):
        raise ValueError(raw)
    if isinstance(raw, int | float):
        return float(raw)
    return float(_text(raw))


BOOL = ValueType("bool", "true/false, 1/0 or yes/no (any case)", _to_bool)

TEXT = ValueType("str", "any non-empty text", lambda raw: _nonempty(_text(raw)))

ANY = ValueType("str", "any value (not used by lmserve)", lambda raw: raw)


def _patterns(raw: object) -> tuple[str, ...]:
    """Regular expressions separated by whitespace (a comma may be part of one, as in ``{1,3}``)."""
    items = tuple(raw) if isinstance(raw, list | tuple) else tuple(_text(raw).split())
    for item in items:
        try:
            re.compile(item)
        except re.error as exc:
            raise ValueError(f"{item!r}: {exc}") from None
    return _nonempty_list(items)


def _names(raw: object) -> tuple[str, ...]:
    items = tuple(raw) if isinstance(raw, list | tuple) else tuple(_text(raw).split(","))
    return _nonempty_list(tuple(str(item).strip() for item in items if str(item).strip()))


def _nonempty_list(items: tuple[str, ...]) -> tuple[str, ...]:
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ValueError("empty")
    return items


PATTERNS = ValueType(
    "regexes", "one or more regular expressions separated by spaces, each matched against the whole "
    "location (write a space inside one as \\s)", _patterns
)

NAMES = ValueType("list", "one or more entries separated by commas", _names)


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("empty")
    return text


def integer(low: int, high: int | None = None) -> ValueType:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None)."""

    def parse(raw: object) -> int:
        value = _to_int(raw)
        if value < low or (high is not None and value > high):
            raise ValueError(value)
        return value

    upper = f" and <= {high}" if high is not None else ""
    return ValueType("int", f"an integer >= {low}{upper}", parse)


def number(low: float, high: float | None = None, *, low_open: bool = False) -> ValueType:
    """A float above ``low`` (exclusive when ``low_open``), at most ``high``."""

    def parse(raw: object) -> float:
        value = _to_float(raw)
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high) or not math.isfinite(value):
            raise ValueError(value)
        return value

    lower = f"> {low:g}" if low_open else f">= {low:g}"
    upper = f" and <= {high:g}" if high is not None else ""
    return ValueType("float", f"a number {lower}{upper}", parse)


TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")  # lmserve.server.tools.parsers implements each


def choice(mapping: Mapping[str, object], extra: str = "") -> ValueType:
    """One of ``mapping``'s keys (any case); the value is what the key maps to."""
    table = {key.lower(): value for key, value in mapping.items()}

    def parse(raw: object) -> object:
        text = str(raw).strip().lower()
        if text not in table:
            raise ValueError(text)
        return table[text]

    return ValueType("choice", f"one of {', '.join(mapping)}{extra}", parse)


def _tensor_parallel(raw: object) -> int:
    if isinstance(raw, str) and raw.strip().lower() == "max":
        return TENSOR_PARALLEL_MAX
    value = _to_int(raw)
    if value < 1 and value != TENSOR_PARALLEL_MAX:
        raise ValueError(value)
    return value


TENSOR_PARALLEL = ValueType(
    "int|max", "an integer >= 1, or 'max' for every device the launcher finds", _tensor_parallel
)


CUSTOM_HANDLER = "model.py"


def _entry_point(raw: object) -> str:
    text = _text(raw)
    if not text or text in LMI_ENTRY_POINTS or text == DEFAULT_ENTRY_POINT:
        return DEFAULT_ENTRY_POINT
    if text.endswith(".py") and len(text) > len(".py"):
        return text  # a custom handler file, relative to the model directory or absolute
    if _MODULE_FUNCTION.fullmatch(text):
        return text  # a handler function of an importable module
    raise ValueError(text)


_MODULE_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


ENTRY_POINT = ValueType(
    "str",
    f"absent or one of {', '.join(LMI_ENTRY_POINTS)} (all served by the default text-generation "
    f"handler '{DEFAULT_ENTRY_POINT}'), a custom handler file ending in .py such as model.py, or "
    "'module:function' naming a handler function",
    _entry_point,
)


OUTPUT_FORMATS = ("json", "jsonlines", "sse")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def _output_formatter(raw: object) -> str:
    text = _text(raw).strip()
    if text.lower() in OUTPUT_FORMATS:
        return text.lower()
    if _IDENTIFIER.fullmatch(text):
        return text  # a function of the model directory's model.py
    raise ValueError(text)


OUTPUT_FORMATTER = ValueType(
    "str",
    f"one of {', '.join(OUTPUT_FORMATS)}, or the name of a function defined in the model directory's model.py",
    _output_formatter,
)

