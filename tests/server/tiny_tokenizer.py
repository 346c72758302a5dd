"""A tiny word-level tokenizer directory, built offline with the ``tokenizers`` library.

Words are split on whitespace and decoded with single spaces between them, so texts are easy to
predict in tests. The chat template renders ``role : content`` pairs and ends with ``assistant :``.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ["<unk>", "<s>", "</s>"]
CONTENT = [f"w{i}" for i in range(40)]
EXTRA = ["hello", "world", "the", "a", "cat", "sat", "on", "mat", ".", ",", "user", "assistant", "system", ":"]
WORDS = SPECIAL + CONTENT + EXTRA
EOS_ID = 2
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tiny_tokenizer(directory: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and config.json into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with one space
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "config.json").write_text(json.dumps({"eos_token_id": EOS_ID, "vocab_size": len(WORDS)}))
    return directory
