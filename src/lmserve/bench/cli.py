"""``lmserve bench URL`` and ``lmserve recommend MODEL``: arguments and entry points.

This module imports only ``argparse`` at load time, so ``lmserve --help`` stays fast; the load
generator, the sweep and their libraries load when a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lmserve.bench.workload_args import add_workload_arguments

BENCH_HELP = "measure a running server: TTFT, TPOT, ITL, latency, throughput, goodput"
RECOMMEND_HELP = "sweep lmserve configurations and rank them by cost under a latency SLO"


def bench_commands(command: Callable[..., Any]) -> list[Any]:
    """The ``bench`` and ``recommend`` subcommands, built with the CLI's ``Command`` type."""
    return [command("bench", BENCH_HELP, add_bench_arguments, run_bench),
            command("recommend", RECOMMEND_HELP, add_recommend_arguments, run_recommend)]  # fmt: skip


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from lmserve.bench import metrics

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "Metric definitions.\n" + metrics.__doc__.split("\n", 1)[1] if metrics.__doc__ else None
    parser.add_argument("url", help="base URL of the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", default=None, help="model name to send (OpenAI 'model'); default: none")
    add_workload_arguments(parser, num_requests=100)
    g = parser.add_argument_group("load")
    g.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight (default %(default)s)")
    g.add_argument("--request-rate", type=float, default=None,
                   help="open loop: requests per second (replaces --concurrency)")
    g.add_argument("--arrival", default="poisson", choices=["poisson", "constant"], help="open loop arrivals")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="open loop: gamma shape of the intervals; 1 = Poisson, < 1 burstier (default %(default)s)")
    g.add_argument("--ramp-up", type=float, default=0.0, help="open loop: seconds to ramp the rate up from 0")
    g.add_argument("--max-concurrency", type=int, default=None, help="open loop: cap on requests in flight")
    g.add_argument("--warmup", type=int, default=1, help="requests sent first and not counted (default %(default)s)")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    g = parser.add_argument_group("output")
    g.add_argument("--slo", default=None, help="goodput objectives, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=5000")
    g.add_argument("--output-json", default=None, help="write the summary and every request's raw timings here")
    g.add_argument("--output-csv", default=None, help="write one row per request here")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_bench(ns: argparse.Namespace) -> int:
    from lmserve.bench.bench import bench_main

    return bench_main(ns)


def add_recommend_arguments(parser: argparse.ArgumentParser) -> None:
    from lmserve.bench.recommend_cli import add_arguments

    add_arguments(parser)


def run_recommend(ns: argparse.Namespace) -> int:
    from lmserve.bench.recommend_cli import recommend_main

    return recommend_main(ns)
