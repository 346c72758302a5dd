"""What a request asks its output to look like: the one description every dialect's structured-output
fields (OpenAI ``response_format``, ``guided_*``, TGI ``grammar``, tool choices) are translated into."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.errors import InvalidRequestError

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one constraint.

    - ``json``: a JSON schema, as JSON text (kept as text so the grammar cache can key on it).
    - ``json_object``: any JSON object.
    - ``regex``: a regular expression the whole output must match.
    - ``choice``: the output is exactly one of these strings.
    - ``grammar``: an EBNF (GBNF) or Lark grammar.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError("structured_outputs",
                                      f"exactly one of {', '.join(KINDS)} must be given, got {set_ or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice", "must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of ``KINDS``."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))


__all__ = ["KINDS", "StructuredOutputs"]
