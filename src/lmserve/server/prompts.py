"""Request text into checked prompt ids, and the new-token limit each prompt leaves room for.

Every inference route turns its prompts into ids here, so the checks are the same on every route
(``lmserve.engine.prompt_limits`` holds the rules, shared with the engine):

- a text is measured in characters before it is tokenized, and one that could never fit in the
  context is refused without tokenizing it (tokenizing costs memory in proportion to the text);
- long texts are tokenized off the event loop on a small pool of their own (``TOKENIZE_THREADS``),
  so a burst of big prompts waits its turn instead of taking every thread and the memory each
  tokenization needs; after a big one, freed memory is handed back to the operating system;
- the ids are checked against the vocabulary and the context, and each request's ``max_new_tokens``
  is fitted beside its prompt (``option.max_tokens_policy``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from lmserve.engine.prompt_limits import (
    MAX_CHARS_PER_TOKEN,
    check_prompt_chars,
    check_prompt_ids,
    fit_new_tokens,
)
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import InvalidRequestError
from lmserve.server.params import check_text
from lmserve.server.runtime import ModelRuntime

T = TypeVar("T")
INLINE_TOKENIZE_CHARS = 20_000  # about 5k tokens: a few milliseconds of tokenizing on the loop
TOKENIZE_THREADS = 2  # big texts tokenized at once: bounds the memory tokenization can take
_TRIM_AFTER_CHARS = 100_000  # after a text this big (~25k tokens), give freed heap memory back
_pool = ThreadPoolExecutor(max_workers=TOKENIZE_THREADS, thread_name_prefix="lmserve-tokenize")


@dataclass(frozen=True)
class NewTokens:
    """A request's new-token limit as the client gave it: ``requested`` (None when omitted) under
    the name ``field``; an omitted limit is ``default`` (None: the rest of the context)."""

    field: str
    requested: int | None
    default: int | None

    @property
    def initial(self) -> int:
        """The limit to validate the other sampling parameters with, before any prompt is known."""
        return self.requested if self.requested is not None else self.default or 1


async def tokenize(rt: ModelRuntime, text: str, field: str) -> list[int]:
    """The text's token ids (with the model's special prefix tokens), if the text can fit."""
    assert rt.tokenizer is not None, "tokenize() is called only when the model is ready"
    return await _encode(rt, text, field, add_special_tokens=True)


async def prompt_ids(rt: ModelRuntime, text: str, field: str, truncate: int | None = None) -> list[int]:
    """A text prompt's checked ids. ``truncate`` (TGI) keeps the last that many tokens; only the
    text's tail that can hold them is tokenized, so a long document with ``truncate`` is served."""
    if truncate:
        ids = await _encode(rt, text[-truncate * MAX_CHARS_PER_TOKEN:], field, add_special_tokens=True)
        ids = ids[-truncate:]
    else:
        ids = await tokenize(rt, text, field)
    return check_prompt(rt, ids, field)


async def chat_prompt_ids(rt: ModelRuntime, messages: list[dict[str, Any]], **template_vars: Any) -> list[int]:
    """Checked ids of a conversation through the model's chat template (``template_vars``: extra
    variables such as ``tools``). The template holds any BOS, so none is added again."""
    tok = rt.tokenizer
    assert tok is not None and rt.model_info is not None, "chat_prompt_ids() is called only when ready"
    chars = sum(len(str(m.get("content") or "")) for m in messages) + len(str(template_vars or ""))
    check_prompt_chars("messages", chars, rt.model_info.max_model_len)
    render = functools.partial(tok.apply_chat_template, messages, **template_vars)
    text = await _run(render) if chars > INLINE_TOKENIZE_CHARS else render()
    return check_prompt(rt, await _encode(rt, text, "messages", add_special_tokens=False), "messages")


def check_prompt(rt: ModelRuntime, ids: list[int], field: str) -> list[int]:
    """``ids`` if the engine can take them: non-empty, known ids, room for one new token."""
    info = rt.model_info
    assert info is not None, "check_prompt() is called only when the model is ready"
    check_prompt_ids(field, ids, info.max_model_len, info.vocab_size)
    return ids


def fit(rt: ModelRuntime, prompts: Sequence[list[int]], params: SamplingParams,
        new: NewTokens) -> list[tuple[list[int], SamplingParams]]:
    """Each prompt with ``params`` whose ``max_new_tokens`` fits beside it (refused with a 400
    naming both numbers, or clamped, as ``option.max_tokens_policy`` says)."""
    info = rt.model_info
    assert info is not None, "fit() is called only when the model is ready"
    jobs = []
    for ids in prompts:
        n = fit_new_tokens(new.field, new.requested, new.default, len(ids), info.max_model_len,
                           rt.config.model.max_tokens_policy)  # fmt: skip
        sized = params if n == params.max_new_tokens else \
            params.replace(max_new_tokens=n, min_new_tokens=min(params.min_new_tokens, n))  # fmt: skip
        jobs.append((ids, sized))
    return jobs


async def _encode(rt: ModelRuntime, text: str, field: str, *, add_special_tokens: bool) -> list[int]:
    tok, info = rt.tokenizer, rt.model_info
    assert tok is not None and info is not None, "_encode() is called only when the model is ready"
    if not text:
        raise InvalidRequestError(field, "must not be empty")
    check_prompt_chars(field, len(text), info.max_model_len)  # before anything copies the text
    check_text(field, text)
    encode = functools.partial(tok.encode, text, add_special_tokens=add_special_tokens)
    if len(text) <= INLINE_TOKENIZE_CHARS:
        return encode()
    return await _run(encode, trim=len(text) >= _TRIM_AFTER_CHARS)


async def _run(work: Callable[[], T], trim: bool = False) -> T:
    """``work()`` on the tokenizer pool; a request that goes away while waiting is never started."""
    job = functools.partial(_trimmed, work) if trim else work
    return await asyncio.get_running_loop().run_in_executor(_pool, job)


def _trimmed(work: Callable[[], T]) -> T:
    try:
        return work()
    finally:
        _malloc_trim()


@functools.cache
def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS): there it is simply not called."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def _malloc_trim() -> None:
    """Hand freed heap memory back to the system: a big tokenization leaves many megabytes free in
    the allocator that it would otherwise keep."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)
