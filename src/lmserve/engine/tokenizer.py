"""The model's tokenizer and chat template, loaded from a model directory.

Imports no torch itself; transformers does when torch is installed, except in the HTTP frontend, which
marks torch absent first (``server.loading.forbid_torch``), so tokenizing there stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmserve.errors import InvalidRequestError, UnsupportedModelError


class Tokenizer:
    """A thin wrapper over the checkpoint's Hugging Face tokenizer."""

    def __init__(self, model_dir: str | Path, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UnsupportedModelError(f"cannot load a tokenizer from {model_dir}: {exc}") from exc
        self.eos_token_ids: tuple[int, ...] = _eos_token_ids(self.model_dir, self._tok)
        self.bos_token_id: int | None = self._tok.bos_token_id
        self.vocab_size: int = len(self._tok)
        self.all_special_ids: frozenset[int] = frozenset(self._tok.all_special_ids)

    @property
    def hf(self) -> Any:
        """The underlying Hugging Face tokenizer."""
        return self._tok

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return list(self._tok.convert_ids_to_tokens(list(token_ids)))

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render chat ``messages`` to the prompt text the model was trained on."""
        if not self.has_chat_template:
            raise InvalidRequestError("messages", "this model has no chat template; use a completion route")
        try:
            text = self._tok.apply_chat_template(list(messages), tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as exc:  # jinja errors are the user's messages not fitting the template
            raise InvalidRequestError("messages", f"cannot apply the chat template: {exc}") from exc
        return str(text)

    def chat_prompt_ids(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of a chat prompt. The template already holds any BOS, so none is added again."""
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


def _eos_token_ids(model_dir: Path, tok: Any) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, config.json and the tokenizer, in that order."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.extend(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    return tuple(dict.fromkeys(ids))
