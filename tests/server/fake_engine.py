"""``FakeEngine``: an ``EngineCore`` without a model, for server and engine-process tests.

Tokens are deterministic: greedy requests continue ``w{(sum(prompt) + i) % 40}``; sampled ones draw
from a ``random.Random(seed)`` of their own, so a seed reproduces a request whatever else runs.
Each request holds "KV blocks" from a fixed pool (``ceil(tokens / block_size)``), freed when it
finishes or is aborted, so ``stats().kv_blocks_free`` shows whether an abort really freed its memory.
A request waits while the pool or ``max_num_seqs`` is exhausted; a running request that cannot grow
is preempted (its blocks freed) and resumes later, as the real engine's recompute does. A prompt
whose first whole blocks match those of an earlier prompt reports them as served from the prefix
cache (``num_cached_tokens``), at most all but its last token, as the real engine's cache does.

Options (keyword arguments, also reachable from the engine spec): ``token_delay_s`` per step,
``load_delay_s`` in the constructor, ``fail_load`` to raise there (``fail_load_if_exists``: when that
file exists, so a test can make only later starts fail), ``eos_after`` (emit end of
sequence after that many tokens unless ``ignore_eos``), ``kv_blocks`` in the pool, ``fail_on_word``
(a step raises when a running prompt holds that word: a crashing engine), ``oom_on_word`` (a request
whose prompt holds that word ends with an out-of-memory error after ``oom_after`` tokens, and the
engine lives on), ``device_from_env``
(report that environment variable's value as the device: what the engine process was given),
``replies`` (word -> text: a request whose prompt holds the word answers that text, ``reply_chunk``
characters per step, then stops: what a real model would write, e.g. a tool call), ``record_to`` (a
file that gets one JSON line per request: its prompt ids and the parameters routes choose for the
engine, such as ``structured``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmserve.config.settings import EngineConfig
from lmserve.engine.outputs import RequestDelta, TokenLogprob
from lmserve.engine.protocol import EngineStats, ModelInfo
from lmserve.engine.sampling_params import SamplingParams
from lmserve.errors import InvalidRequestError

FIRST_CONTENT_ID, NUM_CONTENT = 3, 40  # w0..w39 in tiny_tokenizer.WORDS
DEFAULT_MAX_MODEL_LEN = 128


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    rng: random.Random
    generated: list[int] = field(default_factory=list)
    text: str = ""
    blocks: int = 0
    running: bool = False
    cached: int = 0  # prompt tokens found in the "prefix cache"
    admitted: bool = False
    reply: str | None = None


class FakeEngine:
    """See the module docstring."""

    def __init__(self, config: EngineConfig, *, token_delay_s: float = 0.0, load_delay_s: float = 0.0,
                 fail_load: bool = False, eos_after: int | None = None, kv_blocks: int = 64,
                 fail_on_word: str | None = None, fail_load_if_exists: str | None = None,
                 device_from_env: str | None = None, oom_on_word: str | None = None, oom_after: int = 0,
                 replies: dict[str, str] | None = None, reply_chunk: int = 5, record_to: str | None = None) -> None:
        from tokenizers import Tokenizer

        time.sleep(load_delay_s)
        if fail_load or (fail_load_if_exists is not None and Path(fail_load_if_exists).exists()):
            raise RuntimeError("fake engine told to fail while loading")
        self._tok = Tokenizer.from_file(str(Path(config.model) / "tokenizer.json"))
        self.token_delay_s, self.eos_after = token_delay_s, eos_after
        self.block_size, self.kv_blocks_total, self.kv_blocks_free = config.block_size, kv_blocks, kv_blocks
        self._fail_id = self._tok.token_to_id(fail_on_word) if fail_on_word else None
        self._oom_id, self.oom_after = (self._tok.token_to_id(oom_on_word) if oom_on_word else None), oom_after
        self._info = ModelInfo(
            name=config.served_name or Path(config.model).name,
            max_model_len=config.max_model_len or DEFAULT_MAX_MODEL_LEN,
            vocab_size=self._tok.get_vocab_size(), dtype="fp32", tensor_parallel_degree=1,
            device=os.environ.get(device_from_env, "unset") if device_from_env else "cpu",
            eos_token_ids=(2,), max_num_seqs=config.max_num_seqs, max_num_batched_tokens=256,
            kv_cache_tokens=kv_blocks * config.block_size,
        )  # fmt: skip
        self._replies = {self._tok.token_to_id(word): text for word, text in (replies or {}).items()}
        self.reply_chunk, self.record_to = reply_chunk, record_to
        self._requests: dict[str, _Request] = {}
        self._aborted: list[_Request] = []
        self._counters = {"prompt": 0, "generated": 0, "steps": 0, "preempted": 0, "cached": 0}
        self._prefixes: set[tuple[int, ...]] = set()  # whole-block prefixes of every prompt seen

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        ids = self._tok.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("inputs", "the prompt is empty")
        if len(ids) >= self._info.max_model_len:
            raise InvalidRequestError("inputs", f"the prompt has {len(ids)} tokens; at most "
                                      f"{self._info.max_model_len - 1} fit")  # fmt: skip
        reply = next((text for word, text in self._replies.items() if word in ids), None)
        ends = range(self.block_size, len(ids), self.block_size)  # whole blocks, never the last token
        cached = max((end for end in ends if tuple(ids[:end]) in self._prefixes), default=0)
        self._prefixes.update(tuple(ids[:end]) for end in ends)
        self._counters["cached"] += cached
        self._requests[request_id] = _Request(request_id, ids, params, random.Random(params.seed), reply=reply,
                                              cached=cached)
        if self.record_to:
            with open(self.record_to, "a") as f:
                f.write(json.dumps({"prompt": ids, "params": dataclasses.asdict(params)}) + "\n")

    def abort_request(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            self._release(request)
            self._aborted.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests or self._aborted)

    def stats(self) -> EngineStats:
        running = sum(r.running for r in self._requests.values())
        return EngineStats(num_running=running, num_waiting=len(self._requests) - running,
                           kv_blocks_total=self.kv_blocks_total, kv_blocks_free=self.kv_blocks_free,
                           prompt_tokens_total=self._counters["prompt"],
                           generation_tokens_total=self._counters["generated"],
                           num_preempted_total=self._counters["preempted"],
                           prefix_cache_hit_tokens_total=self._counters["cached"],
                           steps_total=self._counters["steps"])  # fmt: skip

    def step(self) -> list[RequestDelta]:
        out = [RequestDelta(r.request_id, [], "", finish_reason="abort", num_prompt_tokens=len(r.prompt),
                            num_generated_tokens=len(r.generated)) for r in self._aborted]  # fmt: skip
        self._aborted.clear()
        self._admit()
        for request in [r for r in self._requests.values() if r.running]:
            if self._fail_id is not None and self._fail_id in request.prompt:
                raise RuntimeError("fake engine told to crash on this prompt")
            if self._oom_id in request.prompt and len(request.generated) >= self.oom_after:
                self._release(self._requests.pop(request.request_id))
                out.append(RequestDelta(request.request_id, [], "", finish_reason="error", error="fake engine out of "
                                        "memory", error_kind="out_of_memory"))  # fmt: skip
            elif self._grow(request, len(request.prompt) + len(request.generated) + 1):
                out.append(self._next_token(request))
            else:  # out of blocks: preempt it (it keeps its tokens and resumes when blocks free up)
                self._release(request)
                request.running = False
                self._counters["preempted"] += 1
        self._counters["steps"] += 1
        if self.token_delay_s:
            time.sleep(self.token_delay_s)
        return out

    def _admit(self) -> None:
        running = sum(r.running for r in self._requests.values())
        for request in self._requests.values():
            if running >= self._info.max_num_seqs:
                return
            if not request.running and self._grow(request, len(request.prompt) + len(request.generated) + 1):
                request.running, running = True, running + 1
                if not request.admitted:
                    request.admitted = True
                    self._counters["prompt"] += len(request.prompt)

    def _grow(self, request: _Request, tokens: int) -> bool:
        needed = math.ceil(tokens / self.block_size) - request.blocks
        if needed > self.kv_blocks_free:
            return False
        if needed > 0:
            self.kv_blocks_free -= needed
            request.blocks += needed
        return True

    def _release(self, request: _Request) -> None:
        self.kv_blocks_free += request.blocks
        request.blocks = 0

    def _next_token(self, r: _Request) -> RequestDelta:
        if r.reply is not None:
            return self._next_reply_piece(r)
        params, i = r.params, len(r.generated)
        eos = (self.eos_after is not None and i >= self.eos_after and not params.ignore_eos
               and i >= params.min_new_tokens)  # fmt: skip
        if eos:
            token = 2
        elif params.greedy:
            token = FIRST_CONTENT_ID + (sum(r.prompt) + i) % NUM_CONTENT
        else:
            token = FIRST_CONTENT_ID + r.rng.randrange(NUM_CONTENT)
        r.generated.append(token)
        self._counters["generated"] += 1
        full = self._tok.decode(r.generated, skip_special_tokens=True)
        finish, stop_reason = None, None
        for stop in params.stop:
            at = full.find(stop, max(0, len(r.text) - len(stop)))
            if at >= 0:
                full = full[: at + (len(stop) if params.include_stop_str_in_output else 0)]
                finish, stop_reason = "stop", stop
                break
        if finish is None and eos:
            finish = "stop"
        elif finish is None and (i + 1 >= params.max_new_tokens
                                 or len(r.prompt) + i + 1 >= self._info.max_model_len):  # fmt: skip
            finish = "length"
        text, r.text = full[len(r.text):], full
        if finish is not None:
            self._release(self._requests.pop(r.request_id))
        prompt_lps = [TokenLogprob(t, -1.0 - k, ((t, -1.0 - k),)) for k, t in enumerate(r.prompt[1:])] \
            if i == 0 and params.prompt_logprobs is not None else None  # fmt: skip
        return RequestDelta(r.request_id, [token], text, self._logprobs(token, i, params), finish,
                            stop_reason, len(r.prompt), len(r.generated), r.cached,
                            prompt_logprobs=prompt_lps)  # fmt: skip

    def _next_reply_piece(self, r: _Request) -> RequestDelta:
        assert r.reply is not None
        start = len(r.generated) * self.reply_chunk
        piece = r.reply[start:start + self.reply_chunk]
        r.generated.append(FIRST_CONTENT_ID)
        self._counters["generated"] += 1
        finish = "stop" if start + self.reply_chunk >= len(r.reply) else None
        if finish is not None:
            self._release(self._requests.pop(r.request_id))
        return RequestDelta(r.request_id, [FIRST_CONTENT_ID], piece, self._logprobs(FIRST_CONTENT_ID, 0, r.params),
                            finish, None, len(r.prompt), len(r.generated), r.cached)  # fmt: skip

    @staticmethod
    def _logprobs(token: int, i: int, params: SamplingParams) -> list[TokenLogprob] | None:
        if params.logprobs is None:
            return None
        lp = -0.25 * (1 + i % 4)
        others = [FIRST_CONTENT_ID + (token - FIRST_CONTENT_ID + k) % NUM_CONTENT for k in range(1, params.logprobs)]
        top = ((token, lp), *((t, lp - k) for k, t in enumerate(others, 1)))[: params.logprobs]
        return [TokenLogprob(token, lp, tuple(top))]
