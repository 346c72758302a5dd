"""Yardstick: ``lmserve bench`` against GuideLLM, measuring the same lmserve on the same workload.

Starts ``lmserve serve MODEL`` pinned to every core but the last, and runs each load tester pinned to
the last core (``taskset``), closed loop at ``--concurrency``, ``--num-requests`` requests of
``--input-len`` prompt tokens and exactly ``--output-len`` output tokens (end of sequence ignored).
The testers alternate for ``--rounds`` rounds; the table shows each one's median output tokens/s and
TTFT p50 and their ratio. GuideLLM is installed from PyPI into its own virtual environment
(``bench_results/guidellm-0.3.1-venv``), so its dependencies never enter lmserve's.

    python benchmarks/yardstick.py [MODEL] [--concurrency 8] [--num-requests 64] [--rounds 2]

Both tools' prompts are made with the model's own tokenizer, so their lengths match exactly, and
both ask for greedy decoding (GuideLLM through ``--backend-args``: left to OpenAI's default
temperature of 1.0, its requests made the server sample, a different workload). GuideLLM runs its
streams in one worker process (``GUIDELLM__MAX_WORKER_PROCESSES=1``, see ``GUIDELLM_ENV``).

Definitions, as GuideLLM 0.3.1's source has them (``benchmark/benchmark.py``, ``objects/statistics.py``,
``backend/openai.py``): each request's start is taken just before it is sent, its end when the
``[DONE]`` line arrives, its first token at the first line with text, and its output tokens come
from the server's ``usage``. Its output tokens/s (the mean of ``output_tokens_per_second``) is every
request's output tokens over the window from the first request's start to the last one's end: the
same definition as ``lmserve bench``'s throughput over the wall clock, so the table shows GuideLLM's
own number. Its TTFT is ours; its ``time_per_output_token_ms`` divides (last token - first token) by
all output tokens, and its ``inter_token_latency_ms`` by output tokens - 1, which is ours (TPOT), so
the table compares that one.

With the definitions equal, a gap in throughput is a difference in what the server did. To show
which side it is on, the server's own view is read from ``/metrics`` around each run: its mean
end-to-end latency (arrival to last token) against the tester's, and its generated tokens over the
tester's window. A tester whose clock runs ahead of the server's (client-side lag between a
token's arrival and its timestamp, or between one request's end and the next one's send) shows as
"tester lag", and the server is idle for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench_results" / "yardstick"
# GuideLLM 0.8 sends the vLLM-only stream_options.continuous_usage_stats, which lmserve's strict
# OpenAI schema refuses (400); 0.3.1 sends only include_usage, like other OpenAI clients.
GUIDELLM_VERSION = "0.3.1"
VENV = REPO_ROOT / "bench_results" / f"guidellm-{GUIDELLM_VERSION}-venv"


# GuideLLM starts one worker process per stream (up to 10). On the one core it is given here, eight
# processes polling each other's queues added 270-700 ms to every request (the "tester lag" row), and
# its closed loop left the server idle for that long; one worker process runs all streams in one
# event loop (120-170 ms).
GUIDELLM_ENV = {"GUIDELLM__MAX_WORKER_PROCESSES": "1"}
TEMPERATURE = 0.0  # both tools ask for greedy decoding (see the module docstring)


def ensure_guidellm() -> Path:
    """The ``guidellm`` executable in its own virtual environment, created on first use."""
    exe = VENV / "bin" / "guidellm"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"guidellm=={GUIDELLM_VERSION}"], check=True)
    return exe


def default_model_dir() -> str:
    out = subprocess.run([sys.executable, "-m", "lmserve.cli", "pull", "--quiet"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def server_counters(url: str) -> dict[str, float]:
    """The server's totals that the diagnosis compares: end-to-end latency sum and count, tokens."""
    import httpx

    wanted = ("lmserve_e2e_request_latency_seconds_sum", "lmserve_e2e_request_latency_seconds_count",
              "lmserve_generation_tokens_total")  # fmt: skip
    totals = dict.fromkeys(wanted, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in totals:
            totals[name] += float(line.split()[-1])
    return totals


def server_view(before: dict[str, float], after: dict[str, float], window_s: float, client_e2e_ms: float) -> dict[str, float]:
    """The server's mean e2e latency over a run, its tokens/s over the tester's window, and how much
    longer the tester saw each request than the server did."""
    count = after["lmserve_e2e_request_latency_seconds_count"] - before["lmserve_e2e_request_latency_seconds_count"]
    e2e_ms = 1000 * (after["lmserve_e2e_request_latency_seconds_sum"]
                     - before["lmserve_e2e_request_latency_seconds_sum"]) / max(count, 1)  # fmt: skip
    tokens = after["lmserve_generation_tokens_total"] - before["lmserve_generation_tokens_total"]
    return {"server_e2e_mean_ms": e2e_ms, "server_tokens_per_s": tokens / window_s,
            "tester_lag_ms": client_e2e_ms - e2e_ms}  # fmt: skip


def run_lmserve_bench(url: str, args: argparse.Namespace, model_dir: str, core: str, out: Path,
                      num_requests: int | None = None) -> dict[str, float]:  # fmt: skip
    """One ``lmserve bench`` run. No warm-up inside it: the server is warmed once before the first
    round, so neither tool's window holds requests the other's lacks."""
    before = server_counters(url)
    subprocess.run(["taskset", "-c", core, sys.executable, "-m", "lmserve.cli", "bench", url, "--no-progress",
                    "--concurrency", str(args.concurrency), "--num-requests", str(num_requests or args.num_requests),
                    "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                    "--tokenizer", model_dir, "--temperature", str(TEMPERATURE), "--warmup", "0",
                    "--output-json", str(out)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    after = server_counters(url)
    data = json.loads(out.read_text())
    s = data["summary"]
    return {"output_tokens_per_s": s["output_token_throughput"], "ttft_p50_ms": s["ttft_ms"]["p50"],
            "tpot_p50_ms": s["tpot_ms"]["p50"], "e2e_mean_ms": s["e2e_ms"]["mean"],
            **server_view(before, after, s["duration_s"], s["e2e_ms"]["mean"]),
            "tester_cpu_percent": data["bench_cpu"]["percent_of_one_core"]}  # fmt: skip


def run_guidellm(exe: Path, url: str, args: argparse.Namespace, model_dir: str, core: str, out: Path) -> dict[str, float]:
    """One GuideLLM run: the same closed loop (concurrent streams), request count and lengths, and
    the same ``TEMPERATURE``: GuideLLM sends none unless told, and OpenAI's default is 1.0."""
    out.mkdir(parents=True, exist_ok=True)
    counters = server_counters(url)
    before = _cpu_of_children()
    start = time.perf_counter()
    subprocess.run(["taskset", "-c", core, str(exe), "benchmark", "--target", url, "--model", Path(model_dir).name,
                    "--processor", model_dir, "--rate-type", "concurrent", "--rate", str(args.concurrency),
                    "--max-requests", str(args.num_requests),
                    "--data", f"prompt_tokens={args.input_len},output_tokens={args.output_len}",
                    "--output-path", str(out / "benchmarks.json"), "--disable-progress",
                    "--backend-args", json.dumps({"extra_body": {"temperature": TEMPERATURE}})],
                   check=True, stdout=subprocess.DEVNULL, env=os.environ | GUIDELLM_ENV)  # fmt: skip
    wall, cpu = time.perf_counter() - start, _cpu_of_children() - before
    metrics, window = guidellm_metrics(json.loads((out / "benchmarks.json").read_text()))
    return {**metrics, **server_view(counters, server_counters(url), window, metrics["e2e_mean_ms"]),
            # the whole run, start-up included: an upper bound of its timing loop's use
            "tester_cpu_percent": 100 * cpu / wall}  # fmt: skip


def guidellm_metrics(report: dict) -> tuple[dict[str, float], float]:
    """GuideLLM's own numbers (see the module docstring for its definitions) and its window in s.
    Its output tokens/s is checked against the window computed here from its per-request times."""
    bench = report["benchmarks"][0]
    done = bench["requests"]["successful"]
    window = max(r["end_time"] for r in done) - min(r["start_time"] for r in done)
    metrics = bench["metrics"]
    reported = metrics["output_tokens_per_second"]["successful"]["mean"]
    recomputed = sum(r["output_tokens"] for r in done) / window
    if abs(reported - recomputed) > 0.05 * recomputed:  # its mean is of a rate distribution: close, not equal
        print(f"warning: GuideLLM reports {reported:.1f} output tok/s, its requests give {recomputed:.1f} over "
              "their window: its definition is not the one this script assumes")  # fmt: skip
    return {"output_tokens_per_s": reported,
            "ttft_p50_ms": metrics["time_to_first_token_ms"]["successful"]["median"],
            "tpot_p50_ms": metrics["inter_token_latency_ms"]["successful"]["median"],
            "e2e_mean_ms": metrics["request_latency"]["successful"]["mean"] * 1000}, window  # fmt: skip


def _cpu_of_children() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model to serve (default: lmserve's default model)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from lmserve.bench.launch import ServeConfig, ServerProcess

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs at least 2 cores: one for the server, one for the load testers")
    server_cores, tester_core = set(cores[:-1]), str(cores[-1])
    model_dir = args.model or default_model_dir()
    exe = ensure_guidellm()
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = ServeConfig(max_rolling_batch_size=max(args.concurrency, 1))
    results: dict[str, list[dict[str, float]]] = {"lmserve bench": [], "guidellm": []}
    with ServerProcess(model_dir, config, "cpu", RESULTS / "server.log", server_cores,
                       ("--n-positions", str(args.input_len + args.output_len + 32))) as server:  # fmt: skip
        server.wait_ready(1800)
        run_lmserve_bench(server.url, args, model_dir, tester_core, RESULTS / "warm-up.json", args.concurrency)
        print(f"server on cores {sorted(server_cores)}, load testers on core {tester_core}; "
              f"{args.num_requests} requests, concurrency {args.concurrency}, {args.input_len} -> {args.output_len} tokens")  # fmt: skip
        for r in range(args.rounds):
            results["lmserve bench"].append(run_lmserve_bench(server.url, args, model_dir, tester_core,
                                                              RESULTS / f"lmserve-{r}.json"))  # fmt: skip
            results["guidellm"].append(run_guidellm(exe, server.url, args, model_dir, tester_core, RESULTS / f"guidellm-{r}"))
            print(f"round {r + 1}: " + "; ".join(f"{k}: {v[-1]['output_tokens_per_s']:.1f} tok/s, "
                                                  f"TTFT p50 {v[-1]['ttft_p50_ms']:.1f} ms" for k, v in results.items()))  # fmt: skip
    medians = {tool: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for tool, runs in results.items()}
    ours, theirs = medians["lmserve bench"], medians["guidellm"]
    print(f"\n{'median of ' + str(args.rounds) + ' rounds':<24}{'lmserve bench':>15}{'guidellm':>12}{'ratio':>8}")
    for key, label in (("output_tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                       ("tpot_p50_ms", "TPOT p50 (ms)"), ("e2e_mean_ms", "e2e mean (ms)"),
                       ("server_e2e_mean_ms", "server e2e mean (ms)"), ("tester_lag_ms", "tester lag (ms)"),
                       ("server_tokens_per_s", "server tokens/s"), ("tester_cpu_percent", "tester CPU (% core)")):  # fmt: skip
        ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
        print(f"{label:<24}{ours[key]:>15.1f}{theirs[key]:>12.1f}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
