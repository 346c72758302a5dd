"""Streaming detokenization: never half a character, stop strings never leak."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.engine.detokenizer import IncrementalDetokenizer
from lmserve.engine.tokenizer import Tokenizer

TEXT = "Café 🙂 日本語 naïve, emoji 🚀 and done."


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(tokenizer_dir)


def stream(tok: Tokenizer, ids: list[int], **kw) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"), **kw)
    pieces = []
    for i, t in enumerate(ids):
        detok.add_tokens([t])
        pieces.append(detok.take_new_text(finished=i == len(ids) - 1))
    return pieces, detok


def test_pieces_join_to_the_full_decode_and_never_split_a_character(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.split())  # multi-byte characters span several byte-level tokens
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_truncates_and_is_never_streamed(tok: Tokenizer) -> None:
    ids = tok.encode("The capital of France is Paris. Berlin is next.")
    pieces, detok = stream(tok, ids, stop=["Paris."])
    assert detok.stop_string == "Paris."
    assert "".join(pieces) == "The capital of France is "
    assert not any("Par" in p for p in pieces)


def test_stop_string_can_be_kept(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four")
    _, detok = stream(tok, ids, stop=["three"], include_stop_str_in_output=True)
    assert detok.text == "one two three"


def test_flush_emits_an_incomplete_tail_at_the_end(tok: Tokenizer) -> None:
    ids = tok.encode("🙂")
    detok = IncrementalDetokenizer(tok, [])
    detok.add_tokens(ids[:-1])
    assert detok.take_new_text(finished=False) == ""
    detok.flush()
    assert detok.take_new_text(finished=True) != ""
