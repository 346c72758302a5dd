"""Replica scaling on the CPU: one replica on N cores against N replicas on one core each.

Starts ``lmserve serve MODEL --cpu-devices 1`` (one replica owning every core this process may use)
and then ``--cpu-devices N`` (N replicas, each pinned to its own cores), and drives both with the
same closed-loop load of streaming ``/v1/completions`` requests (serve_throughput's workload:
random-token prompts, end-of-sequence ignored, greedy). Prints, per configuration, the thread split
the server reports (``GET /models/{name}``), how many requests each replica served, output tokens/s
and TTFT/TPOT percentiles, then the ratio. Rounds alternate the configurations, so drift from other
work on the machine hits both; the table gives each configuration's best round and the ratio of the
bests (every round is printed too).

    python benchmarks/replica_scaling.py [MODEL] [--replicas 2] [--rounds 2] [--concurrency 32]
    python benchmarks/replica_scaling.py --fake     # smoke run: the test suite's fake engine

Target: N replicas reach at least 90% of one replica's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import (  # noqa: E402  (a sibling script, not a package)
    REPO_ROOT,
    Sample,
    drive,
    make_prompts,
    percentile,
    start_server,
    stop_server,
)


@dataclass
class Run:
    label: str
    replicas: list[dict]
    samples: list[Sample]
    wall: float

    @property
    def throughput(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall


def start(model: str | None, cpu_devices: int, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    return start_server(model, args, ["--cpu-devices", str(cpu_devices), "--option", "option.parallel_loading=true"])


def measure(model: str | None, cpu_devices: int, prompts: list[list[int]], args: argparse.Namespace) -> Run:
    proc, url = start(model, cpu_devices, args)
    try:
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        before = httpx.get(f"{url}/models/{name}").json()["replicas"]
        samples, wall = asyncio.run(drive(url, name, prompts, args.max_new_tokens, args.concurrency))
        after = httpx.get(f"{url}/models/{name}").json()["replicas"]
    finally:
        stop_server(proc)
    for b, a in zip(before, after, strict=True):
        a["served"] = a["requests_total"] - b["requests_total"]
    label = f"{len(after)} replica{'s' if len(after) > 1 else ''}"
    return Run(label, after, list(samples), wall)


def describe(run: Run) -> str:
    parts = []
    for r in run.replicas:
        d = r["devices"]
        parts.append(f"#{r['id']}: cores {d.get('cpus')}, {d.get('threads_per_rank')} thread(s), {r['served']} req")
        if d.get("kind") == "cuda":
            parts[-1] = f"#{r['id']}: GPUs {d['gpus']}, {r['served']} req"
    return "; ".join(parts)


def report(best: dict[str, Run], args: argparse.Namespace) -> None:
    print(f"\nworkload: {args.num_requests} streaming requests, {args.prompt_len} prompt tokens, "
          f"{args.max_new_tokens} new tokens, concurrency {args.concurrency}; best of {args.rounds} round(s)")  # fmt: skip
    print(f"{'configuration':<14}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p90':>10}{'TPOT p50':>10}{'TPOT p90':>10}  "
          "placement (threads per rank, requests served)")  # fmt: skip
    for run in best.values():
        ttft = [s.ttft * 1000 for s in run.samples]
        tpot = [(s.e2e - s.ttft) / (s.tokens - 1) * 1000 for s in run.samples if s.tokens > 1]
        print(f"{run.label:<14}{run.throughput:>10.1f}{percentile(ttft, 50):>10.1f}{percentile(ttft, 90):>10.1f}"
              f"{percentile(tpot, 50):>10.1f}{percentile(tpot, 90):>10.1f}  {describe(run)}")  # fmt: skip
    one, many = best.values()
    ratio = many.throughput / one.throughput
    print(f"\n{many.label} / {one.label}: {ratio:.2f} (target >= 0.90: {'met' if ratio >= 0.9 else 'missed'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model to serve (default: lmserve's default model)")
    parser.add_argument("--fake", action="store_true", help="serve the test suite's fake engine (smoke run)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas (CPU devices) of the second configuration")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both configurations")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="engine batch size per replica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-timeout", type=float, default=1800)
    args = parser.parse_args()
    lo, hi = (3, 43) if args.fake else (100, 1000)
    prompts = make_prompts(args.num_requests, args.prompt_len, lo, hi, args.seed)
    model = args.model
    if args.fake:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.server.tiny_tokenizer import build_tiny_tokenizer

        model = str(build_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="lmserve-bench-")) / "tiny"))
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} core(s) available; configurations: --cpu-devices 1 and --cpu-devices {args.replicas}")
    best: dict[str, Run] = {}
    for round_ in range(args.rounds):
        for devices in (1, args.replicas):
            run = measure(model, devices, prompts, args)
            print(f"round {round_ + 1}: {run.label:<12} {run.throughput:8.1f} tokens/s  ({describe(run)})", flush=True)
            if run.label not in best or run.throughput > best[run.label].throughput:
                best[run.label] = run
    report(best, args)


if __name__ == "__main__":
    main()
