"""What the OpenAI routes share: fan-out of ``n`` choices, usage, ids, and the SSE ending."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from lmserve.engine.sampling_params import SamplingParams
from lmserve.server.generation import Completion


def fan_out(jobs: Sequence[tuple[list[int], SamplingParams]], n: int) -> list[tuple[list[int], SamplingParams]]:
    """``n`` requests per prompt, choice ``i`` of a prompt seeded ``seed + i`` (so a seeded request is
    reproducible and its choices differ; greedy choices are identical)."""
    out = []
    for prompt, params in jobs:
        for i in range(n):
            seeded = params if params.seed is None or i == 0 else params.replace(seed=params.seed + i)
            out.append((prompt, seeded))
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` counts the prompt tokens served
    from the prefix cache (a benchmark that finds them there did not measure their prefill)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}  # fmt: skip


def usage_of(prompts: Sequence[list[int]], results: Sequence[Completion]) -> dict[str, Any]:
    """``results`` hold ``n`` choices per prompt, prompt by prompt: each prompt counts once, with the
    cached tokens of its first choice."""
    n = len(results) // max(1, len(prompts))
    return usage(sum(len(p) for p in prompts), sum(len(c.token_ids) for c in results),
                 sum(results[i * n].num_cached_tokens for i in range(len(prompts))) if n else 0)


def openai_finish_reason(finish_reason: str | None) -> str | None:
    return "length" if finish_reason == "length" else None if finish_reason is None else "stop"


def envelope(kind: str, model: str, prefix: str) -> dict[str, Any]:
    """The fields every OpenAI response or chunk starts with."""
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}
