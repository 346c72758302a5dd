"""Frontend memory when many huge prompts arrive at once: resident memory before, at the peak and
after tokenizing them, the old way (every prompt at once on the default thread pool) against the
server's tokenizer pool (``lmserve.server.prompts``), with and without handing freed memory back.

Each mode runs in a fresh process, so one does not inherit another's heap. Linux only (reads
``/proc/self/status``). Not a timed test: it prints a table.

    python benchmarks/prompt_memory.py --prompts 12 --mb 8      # the sizes of the original report
    python benchmarks/prompt_memory.py --tokenizer <model dir>  # default: the default model's
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

MODES = {
    "default-pool": "all at once on asyncio's default thread pool (before the fix)",
    "capped": "lmserve's tokenizer pool, without malloc_trim",
    "capped+trim": "lmserve's tokenizer pool, malloc_trim after big prompts (the server)",
}
WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
         "not", "this", "are", "or", "from", "at", "which", "but", "have", "they", "you", "there", "would",
         "1984", "2048", "3.14", "x_y", "{}", "[]", "()")  # fmt: skip


def _memory_mb() -> dict[str, float]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def _text(mb: float, seed: int) -> str:
    rng = random.Random(seed)
    words, size = [], 0
    while size < mb * 2**20:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


async def _tokenize_all(mode: str, tokenizer: Any, texts: list[str]) -> int:
    if mode == "default-pool":
        results = await asyncio.gather(*(asyncio.to_thread(tokenizer.encode, t) for t in texts))
        return sum(len(r) for r in results)
    from lmserve.server import prompts

    if mode == "capped":
        prompts._malloc_trim = lambda: None  # type: ignore[assignment]
    longest = max(len(t) for t in texts)
    rt = SimpleNamespace(tokenizer=tokenizer, model_info=SimpleNamespace(max_model_len=longest))  # admits them all
    counts = await asyncio.gather(*(prompts.tokenize(rt, t, "inputs") for t in texts))  # type: ignore[arg-type]
    return sum(len(c) for c in counts)


def run_one(mode: str, tokenizer_dir: str, prompts: int, mb: float) -> dict[str, Any]:
    """One mode in this process: memory before, peak and after (references dropped, gc run)."""
    from lmserve.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)
    texts = [_text(mb, seed) for seed in range(prompts)]
    gc.collect()
    before = _memory_mb()["VmRSS"]
    tokens = asyncio.run(_tokenize_all(mode, tokenizer, texts))
    gc.collect()
    after = _memory_mb()
    return {"mode": mode, "tokens": tokens, "before": before, "peak": after["VmHWM"], "after": after["VmRSS"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--mb", type=float, default=8.0, help="size of each prompt in MiB of text")
    parser.add_argument("--tokenizer", help="a model directory with a tokenizer (default: the default model)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    if args.tokenizer is None:
        from lmserve.store.default_model import pull_default_model

        args.tokenizer = str(pull_default_model(progress=False))
    if args.mode:
        print(json.dumps(run_one(args.mode, args.tokenizer, args.prompts, args.mb)))
        return
    print(f"{args.prompts} prompts of {args.mb:g} MiB each, tokenized at once; resident memory in MiB "
          "(text already in memory before)")  # fmt: skip
    print(f"| {'mode':<14} | {'before':>7} | {'peak':>7} | {'after':>7} | {'kept':>7} | tokens |")
    print(f"|{'-' * 16}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--tokenizer", args.tokenizer,
                              "--prompts", str(args.prompts), "--mb", str(args.mb)],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {mode:<14} | {r['before']:>7.0f} | {r['peak']:>7.0f} | {r['after']:>7.0f} | "
              f"{r['after'] - r['before']:>7.0f} | {r['tokens']} |")
    for mode, what in MODES.items():
        print(f"- {mode}: {what}")


if __name__ == "__main__":
    main()
