"""``from djl_python.output_formatter import TextGenerationOutput, output_formatter`` (the containers'
module for custom output formatters): lmserve's own classes, see ``lmserve.handlers.output_formatter``."""

from lmserve.handlers.output_formatter import (
    RequestOutput,
    Sequence,
    TextGenerationOutput,
    TextInput,
    Token,
    output_formatter,
)

__all__ = ["RequestOutput", "Sequence", "TextGenerationOutput", "TextInput", "Token", "output_formatter"]
