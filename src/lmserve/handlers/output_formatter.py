"""Custom output formatters: a function of the model directory's ``model.py`` that writes the
``/invocations`` answer of the default text-generation handler, as in the managed LMI containers.

``option.output_formatter=my_formatter`` names the function. It is called once per generated token
of each request (streaming or not) with a ``TextGenerationOutput``; the strings it returns,
concatenated, are the answer. Its best sequence's ``get_next_token()`` hands out the token of this
call with ``is_first_token`` and ``is_last_token``; ``tokens`` holds every token so far, and
``finish_reason`` (TGI's words: ``length``, ``eos_token``, ``stop_sequence``) is set on the last
one. These classes are importable as ``djl_python.output_formatter``, so a formatter written for
those containers runs unchanged. The module imports nothing heavy: it is loaded in the server
process, where the answers are written.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve.errors import UnsupportedModelError

FORMATTER_FILE = "model.py"


@dataclass
class Token:
    """One generated token."""

    id: int
    text: str
    log_prob: float | None = None
    special_token: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "log_prob": self.log_prob, "special_token": self.special_token}


@dataclass
class Sequence:
    """The tokens generated so far; ``get_next_token`` walks them, one per formatter call."""

    tokens: list[Token] = field(default_factory=list)
    cumulative_log_prob: float = 0.0
    finish_reason: str | None = None
    _next: int = 0
    _finished: bool = False

    def has_next_token(self) -> bool:
        return self._next < len(self.tokens)

    def get_next_token(self) -> tuple[Token, bool, bool]:
        """(the next token, whether it is the first, whether it is the last of the answer)."""
        token = self.tokens[self._next]
        self._next += 1
        return token, self._next == 1, self._finished and self._next == len(self.tokens)


@dataclass
class TextInput:
    """The request: its text, prompt token ids and generation parameters."""

    request_id: int
    input_text: str
    input_ids: list[int]
    parameters: dict[str, Any]
    output_formatter: Any = None
    adapters: Any = None
    tokenizer: Any = None


@dataclass
class RequestOutput:
    """What a formatter is given: the request and whether it has finished."""

    request_id: int
    input: TextInput
    finished: bool = False


@dataclass
class TextGenerationOutput(RequestOutput):
    """A text-generation request's output; lmserve generates one sequence, index 0."""

    sequences: dict[int, Sequence] = field(default_factory=lambda: {0: Sequence()})
    best_sequence_index: int = 0
    prompt_tokens_details: list[Token] = field(default_factory=list)

    def add_token(self, token: Token, last: bool, finish_reason: str | None) -> None:
        """Append a token before the formatter's call for it (``last``: the answer ends with it)."""
        sequence = self.sequences[self.best_sequence_index]
        sequence.tokens.append(token)
        sequence.cumulative_log_prob += token.log_prob or 0.0
        sequence._finished = self.finished = last
        if last:
            sequence.finish_reason = finish_reason


Formatter = Callable[[TextGenerationOutput], str]


def output_formatter(function: Formatter) -> Formatter:
    """The containers' decorator for formatter functions; lmserve finds the function by its name in
    ``option.output_formatter``, so this only marks it."""
    function._lmserve_output_formatter = True  # type: ignore[attr-defined]
    return function


def load_output_formatter(handler_dir: Path, name: str) -> Formatter:
    """The function ``name`` of ``handler_dir/model.py``.

    Raises:
        UnsupportedModelError: no model.py, it fails to import, or it has no such function.
    """
    path = handler_dir / FORMATTER_FILE
    where = f"option.output_formatter={name!r} names a function of {path}"
    if not path.is_file():
        raise UnsupportedModelError(f"{where}, which does not exist (allowed: json, jsonlines, sse, or a function "
                                    "defined in model.py beside serving.properties)")  # fmt: skip
    spec = importlib.util.spec_from_file_location(f"lmserve_output_formatter_{abs(hash(str(path)))}", path)
    assert spec is not None and spec.loader is not None, "a .py file always has a loader"
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(handler_dir))  # model.py may import its neighbours, as a handler's can
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UnsupportedModelError(f"{where}; importing it failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(handler_dir))
    function = getattr(module, name, None)
    if not callable(function):
        raise UnsupportedModelError(f"{where}, which defines no function of that name")
    return function  # type: ignore[no-any-return]
