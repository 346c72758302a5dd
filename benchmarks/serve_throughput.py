"""Serving throughput: concurrent streaming clients against lmserve's HTTP server, one fixed workload.

Starts ``lmserve serve MODEL`` (or targets ``--url``), sends ``--num-requests`` requests from
``--concurrency`` streaming clients (closed loop) to ``/v1/completions``: random-token prompts of
``--prompt-len`` tokens, ``--max-new-tokens`` each with end-of-sequence ignored, greedy. Prints output
tokens/s over the wall clock and TTFT / TPOT percentiles. When it started the server itself, it then
stops it and runs the same workload through the offline engine (``lmserve.LLM``) in this process, and
prints served / offline throughput.

    python benchmarks/serve_throughput.py [MODEL] [--concurrency 32] [--num-requests 64]
    python benchmarks/serve_throughput.py --url http://127.0.0.1:8080
    python benchmarks/serve_throughput.py --fake      # smoke run: the test suite's fake engine
    python benchmarks/serve_throughput.py --burst     # 16 prompts of 200 tokens arriving together
    python benchmarks/serve_throughput.py --colocated-load   # then again beside a busy process

``--burst`` sends every request at once (concurrency = number of requests; 16 prompts of 200 tokens
unless told otherwise) and reports TTFT p50/p95. ``--colocated-load`` runs a workload of the same
shape (fresh prompts, so none is in the prefix cache) on the same server while a busy process
(``while True: pass``) pinned to one core (``--colocated-core``, default the last core this process
may use) competes for the CPU, and reports throughput against the uncontended run and how many
requests ran into ``predict_timeout``.

Definitions: TTFT = send to first streamed token; TPOT = (e2e - TTFT) / (output tokens - 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_FACTORY = "tests.server.fake_engine:FakeEngine"
FAKE_OPTIONS = {"token_delay_s": 0.005, "kv_blocks": 4096}


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int
    error: str | None = None  # why the request failed; None when it completed

    @property
    def timed_out(self) -> bool:
        return self.error is not None and ("504" in self.error or "predict_timeout" in self.error)


# ---- the workload --------------------------------------------------------------------------------


def make_prompts(n: int, length: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


async def one_request(http: httpx.AsyncClient, model: str, prompt: list[int], max_new_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    sent, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            error = f"HTTP {r.status_code}: {(await r.aread()).decode()}"
            return Sample(time.perf_counter() - sent, time.perf_counter() - sent, 0, error)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Sample(time.perf_counter() - sent, time.perf_counter() - sent, tokens,
                              f"stream error: {chunk['error']}")
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return Sample((first or end) - sent, end - sent, tokens)


async def drive(url: str, model: str, prompts: list[list[int]], max_new_tokens: int,
                concurrency: int) -> tuple[list[Sample], float]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:

        async def gated(prompt: list[int]) -> Sample:
            async with gate:
                return await one_request(http, model, prompt, max_new_tokens)

        warm = await one_request(http, model, prompts[0][:8], 2)
        if warm.error:
            raise RuntimeError(f"the warm-up request failed: {warm.error}")
        start = time.perf_counter()
        samples = await asyncio.gather(*(gated(p) for p in prompts))
        return list(samples), time.perf_counter() - start


# ---- the server ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str | None, args: argparse.Namespace,
                 extra: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``lmserve serve`` for the workload in ``args`` (plus ``extra`` flags); wait until ready."""
    port = free_port()
    command = [sys.executable, "-m", "lmserve.cli", "serve", *([model] if model else []), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--max-batch-size", str(args.max_num_seqs),
               "--n-positions", str(args.prompt_len + args.max_new_tokens + 8), *extra]  # fmt: skip
    env = dict(os.environ, SERVING_JOB_QUEUE_SIZE=str(max(1000, args.num_requests)))
    if args.fake:
        command += ["--block-size", "4", "--engine-factory", FAKE_FACTORY, "--engine-options", json.dumps(FAKE_OPTIONS)]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit("the server did not become ready")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- a co-located load ---------------------------------------------------------------------------


def start_busy_process(core: int) -> subprocess.Popen[bytes]:
    """A process that keeps ``core`` busy (as a sidecar or a neighbour's job would) until stopped."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(proc.pid, {core})
    except OSError:
        proc.kill()
        raise
    return proc


def stop_busy_process(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


# ---- the offline baseline ------------------------------------------------------------------------


def offline_throughput(model_dir: str, prompts: list[list[int]], args: argparse.Namespace) -> float:
    """Output tokens/s of the same workload driven straight through an engine in this process."""
    from lmserve import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    if args.fake:
        sys.path.insert(0, str(REPO_ROOT))
        from lmserve.config.settings import EngineConfig
        from tests.server.fake_engine import FakeEngine

        config = EngineConfig(model=model_dir, max_model_len=args.prompt_len + args.max_new_tokens + 8,
                              max_num_seqs=args.max_num_seqs, block_size=4)  # fmt: skip
        engine: Any = FakeEngine(config, **FAKE_OPTIONS)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"offline-{i}", prompt, params)
        start, tokens = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            tokens += sum(len(d.token_ids) for d in engine.step())
        return tokens / (time.perf_counter() - start)
    from lmserve import LLM

    llm = LLM(model_dir, max_num_seqs=args.max_num_seqs, max_model_len=args.prompt_len + args.max_new_tokens + 8)
    # Warm up on the first two prompts reversed: the workload's own would stay in the prefix cache.
    llm.generate([p[::-1] for p in prompts[:2]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start)


# ---- report --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def report(samples: list[Sample], wall: float, args: argparse.Namespace, title: str) -> float:
    done = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in samples)
    throughput = tokens / wall
    ttft = [s.ttft * 1000 for s in done]
    tpot = [(s.e2e - s.ttft) / (s.tokens - 1) * 1000 for s in done if s.tokens > 1]
    print(f"\n{title}: {len(samples)} requests, {args.prompt_len} prompt tokens, {args.max_new_tokens} new "
          f"tokens, concurrency {args.concurrency}")  # fmt: skip
    print(f"{'served output tokens/s':<26}{throughput:>10.1f}   ({tokens} tokens in {wall:.2f}s)")
    print(f"{'':<26}{'p50':>10}{'p90':>10}{'p95':>10}{'p99':>10}")
    for name, values in (("TTFT (ms)", ttft), ("TPOT (ms)", tpot)):
        print(f"{name:<26}" + "".join(f"{percentile(values, q):>10.1f}" for q in (50, 90, 95, 99)))
    failed = [s for s in samples if s.error is not None]
    timed_out = sum(s.timed_out for s in failed)
    print(f"{'failed requests':<26}{len(failed):>10}   ({timed_out} ran into predict_timeout)")
    for error in sorted({s.error for s in failed if not s.timed_out and s.error})[:3]:
        print(f"  {error[:200]}")
    return throughput


def run_workload(url: str, prompts: list[list[int]], args: argparse.Namespace, title: str) -> float:
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    samples, wall = asyncio.run(drive(url, model, prompts, args.max_new_tokens, args.concurrency))
    return report(samples, wall, args, title)


def run_colocated(url: str, prompts: list[list[int]], args: argparse.Namespace, uncontended: float) -> None:
    cores = sorted(os.sched_getaffinity(0))
    core = cores[-1] if args.colocated_core is None else args.colocated_core
    busy = start_busy_process(core)
    try:
        time.sleep(args.colocated_settle)  # as a sidecar would be: already running when traffic comes
        contended = run_workload(url, prompts, args, f"beside a busy process on core {core} of {cores}")
    finally:
        stop_busy_process(busy)
    print(f"{'contended / uncontended':<26}{contended / uncontended:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model to serve (default: lmserve's default model)")
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument("--fake", action="store_true", help="serve the test suite's fake engine (smoke run)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="engine batch size when starting the server")
    parser.add_argument("--token-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="prompt token ids are drawn from [LO, HI) (default 100 1000; 3 43 with --fake)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-timeout", type=float, default=1800)
    parser.add_argument("--burst", action="store_true",
                        help="all requests arrive together (default 16 prompts of 200 tokens, 128 new tokens)")
    parser.add_argument("--colocated-load", action="store_true",
                        help="run the workload again beside a busy process pinned to one core")
    parser.add_argument("--colocated-core", type=int, default=None, help="core of the busy process (default: last)")
    parser.add_argument("--colocated-settle", type=float, default=3.0,
                        help="seconds the busy process runs before the contended run starts")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline comparison")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a serving.properties key for the server it starts, e.g. option.adaptive_threads=false")
    args = parser.parse_args()
    if args.burst:
        for name, value in (("num_requests", 16), ("prompt_len", 200), ("max_new_tokens", 128)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.concurrency = args.num_requests
    lo, hi = args.token_range or ((3, 43) if args.fake else (100, 1000))
    prompts = make_prompts(args.num_requests, args.prompt_len, lo, hi, args.seed)

    model_dir, proc = args.model, None
    if args.fake:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.server.tiny_tokenizer import build_tiny_tokenizer

        model_dir = str(build_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="lmserve-bench-")) / "tiny"))
    url = args.url
    if url is None:
        proc, url = start_server(model_dir, args, [f"--option={item}" for item in args.option])
    try:
        served = run_workload(url, prompts, args, "burst" if args.burst else "workload")
        if args.colocated_load:
            # Fresh prompts of the same shape: the first run's are in the server's prefix cache.
            run_colocated(url, make_prompts(args.num_requests, args.prompt_len, lo, hi, args.seed + 1), args, served)
    finally:
        if proc is not None:
            stop_server(proc)
    if proc is None or args.no_offline:
        return
    if model_dir is None:
        from lmserve.store.default_model import pull_default_model

        model_dir = str(pull_default_model())
    offline = offline_throughput(model_dir, prompts, args)
    print(f"{'offline output tokens/s':<26}{offline:>10.1f}")
    print(f"{'served / offline':<26}{served / offline:>10.2f}")


if __name__ == "__main__":
    main()
