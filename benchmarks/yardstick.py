"""Yardstick: ``lmserve bench`` against GuideLLM, measuring the same lmserve on the same workload.

Starts ``lmserve serve MODEL`` pinned to every core but the last, and runs each load tester pinned to
the last core (``taskset``), closed loop at ``--concurrency``, ``--num-requests`` requests of
``--input-len`` prompt tokens and exactly ``--output-len`` output tokens (end of sequence ignored).
The testers alternate for ``--rounds`` rounds; the table shows each one's median output tokens/s and
TTFT p50 and their ratio. GuideLLM is installed from PyPI into its own virtual environment
(``bench_results/guidellm-0.3.1-venv``), so its dependencies never enter lmserve's.

    python benchmarks/yardstick.py [MODEL] [--concurrency 8] [--num-requests 64] [--rounds 2]

Both tools' prompts are made with the model's own tokenizer, so their lengths match exactly.
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


def run_lmserve_bench(url: str, args: argparse.Namespace, model_dir: str, core: str, out: Path) -> dict[str, float]:
    subprocess.run(["taskset", "-c", core, sys.executable, "-m", "lmserve.cli", "bench", url, "--no-progress",
                    "--concurrency", str(args.concurrency), "--num-requests", str(args.num_requests),
                    "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                    "--tokenizer", model_dir, "--warmup", "2", "--output-json", str(out)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    data = json.loads(out.read_text())
    s = data["summary"]
    return {"output_tokens_per_s": s["output_token_throughput"], "ttft_p50_ms": s["ttft_ms"]["p50"],
            "tpot_p50_ms": s["tpot_ms"]["p50"], "tester_cpu_percent": data["bench_cpu"]["percent_of_one_core"]}  # fmt: skip


def run_guidellm(exe: Path, url: str, args: argparse.Namespace, model_dir: str, core: str, out: Path) -> dict[str, float]:
    """One GuideLLM run: the same closed loop (concurrent streams), request count and lengths."""
    out.mkdir(parents=True, exist_ok=True)
    before = _cpu_of_children()
    start = time.perf_counter()
    subprocess.run(["taskset", "-c", core, str(exe), "benchmark", "--target", url, "--model", Path(model_dir).name,
                    "--processor", model_dir, "--rate-type", "concurrent", "--rate", str(args.concurrency),
                    "--max-requests", str(args.num_requests),
                    "--data", f"prompt_tokens={args.input_len},output_tokens={args.output_len}",
                    "--output-path", str(out / "benchmarks.json"), "--disable-progress"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    wall, cpu = time.perf_counter() - start, _cpu_of_children() - before
    return {**guidellm_metrics(json.loads((out / "benchmarks.json").read_text())),
            # the whole run, start-up included: an upper bound of its timing loop's use
            "tester_cpu_percent": 100 * cpu / wall}  # fmt: skip


def guidellm_metrics(report: dict) -> dict[str, float]:
    """Throughput by lmserve bench's definition (output tokens from first send to last end) over
    GuideLLM's own per-request times; TTFT and TPOT medians as GuideLLM reports them."""
    bench = report["benchmarks"][0]
    done = bench["requests"]["successful"]
    wall = max(r["end_time"] for r in done) - min(r["start_time"] for r in done)
    metrics = bench["metrics"]
    return {"output_tokens_per_s": sum(r["output_tokens"] for r in done) / wall,
            "ttft_p50_ms": metrics["time_to_first_token_ms"]["successful"]["median"],
            "tpot_p50_ms": metrics["time_per_output_token_ms"]["successful"]["median"]}  # fmt: skip


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
                       ("tpot_p50_ms", "TPOT p50 (ms)"), ("tester_cpu_percent", "tester CPU (% core)")):  # fmt: skip
        ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
        print(f"{label:<24}{ours[key]:>15.1f}{theirs[key]:>12.1f}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
