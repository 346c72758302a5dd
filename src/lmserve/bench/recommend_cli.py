"""``lmserve recommend MODEL``: arguments, the plan (and its dry run), the sweep, the files."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
from pathlib import Path
from typing import Any

from lmserve.bench import BenchUsageError
from lmserve.bench.workload_args import check_workload

DEFAULT_SLO = "ttft_ms=1000,tpot_ms=100"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmserve.bench.workload_args import add_workload_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "For each configuration of the grid, lmserve is started and its highest load meeting the SLO\n"
        "is searched: a synchronous probe (concurrency 1), a saturation probe (a full batch on every\n"
        "replica, at most --max-concurrency), then doubling and bisection over concurrency. Each\n"
        "level sends at least --min-requests requests (and two per request in flight). The\n"
        "configurations are priced, ranked by cost per million output tokens, and written to\n"
        "--output-dir: results.json, results.csv, report.html, serving.properties (the winner).\n"
        "Started again with the same --output-dir, a sweep skips configurations already measured."
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="what `lmserve serve` takes: directory, .tar.gz, s3://, Hub id, .gguf; "
                             "default: lmserve's default model")  # fmt: skip
    parser.add_argument("--output-dir", default=None, help="where results go (default: recommend-<model name>)")
    g = parser.add_argument_group("grid (comma-separated values; 'none' keeps lmserve's default)")
    g.add_argument("--tp", default="1", help="option.tensor_parallel_degree values (default %(default)s)")
    g.add_argument("--replicas", default="1", help="replicas (default %(default)s)")
    g.add_argument("--max-batch-size", default="1,8,32", help="option.max_rolling_batch_size (default %(default)s)")
    g.add_argument("--max-batched-tokens", default="none", help="option.max_rolling_batch_prefill_tokens")
    g.add_argument("--dtype", default="none", help="option.dtype values, e.g. bf16,fp32")
    g.add_argument("--batch-size", default="none", help="batch_size (non-generative handlers)")
    g.add_argument("--max-batch-delay", default="none", help="max_batch_delay in ms (non-generative handlers)")
    g = parser.add_argument_group("search")
    g.add_argument("--slo", default=DEFAULT_SLO, help="latency limits in ms (default %(default)s)")
    g.add_argument("--slo-percentile", type=int, default=95, choices=[50, 90, 95, 99],
                   help="the percentile held to the SLO (default %(default)s)")  # fmt: skip
    g.add_argument("--min-requests", type=int, default=40, help="fewest requests per load level (default %(default)s)")
    g.add_argument("--max-concurrency", type=int, default=128, help="highest concurrency tried (default %(default)s)")
    g.add_argument("--bisect-steps", type=int, default=3, help="bisection steps after doubling (default %(default)s)")
    add_workload_arguments(parser, num_requests=0)
    g = parser.add_argument_group("price")
    g.add_argument("--prices", default=None, help="price table JSON (default: the table shipped with lmserve)")
    g.add_argument("--instance", default=None, help="price as this instance of the table")
    g.add_argument("--price-per-hour", type=float, default=None, help="price your own machine instead")
    g = parser.add_argument_group("servers")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device of the servers")
    g.add_argument("--pin", default="auto", choices=["auto", "on", "off"],
                   help="pin server and load generator to separate cores; auto: with 4 or more cores")  # fmt: skip
    g.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every `lmserve serve` (repeat), e.g. --serve-arg=--n-positions=512")  # fmt: skip
    g.add_argument("--load-timeout", type=float, default=1800.0, help="seconds a server may take to be ready")
    g.add_argument("--fresh", action="store_true", help="ignore results already in --output-dir")
    g.add_argument("--dry-run", action="store_true", help="print the plan and its estimated duration, run nothing")
    g.add_argument("--assume-startup-s", type=float, default=60.0, help="dry run: seconds per server start")
    g.add_argument("--assume-tpot-ms", type=float, default=50.0, help="dry run: ms per output token")


def parse_grid(flag: str, text: str, kind: type) -> list[Any]:
    values: list[Any] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() == "none":
            values.append(None)
            continue
        try:
            value = kind(part)
        except ValueError:
            raise BenchUsageError(f"{flag}: {part!r} is not a {kind.__name__} (or 'none')") from None
        if kind is not str and value <= 0:
            raise BenchUsageError(f"{flag}: {part!r} must be > 0")
        values.append(value)
    return values


def build_plan(ns: argparse.Namespace) -> Any:
    from lmserve.bench.launch import ServeConfig
    from lmserve.bench.metrics import parse_slo
    from lmserve.bench.prices import PriceTable, choose_pricing, local_gpus
    from lmserve.bench.sweep import Pinning, SweepPlan

    grid = [parse_grid("--tp", ns.tp, int), parse_grid("--replicas", ns.replicas, int),
            parse_grid("--max-batch-size", ns.max_batch_size, int),
            parse_grid("--max-batched-tokens", ns.max_batched_tokens, int), parse_grid("--dtype", ns.dtype, str),
            parse_grid("--batch-size", ns.batch_size, int), parse_grid("--max-batch-delay", ns.max_batch_delay, float)]  # fmt: skip
    configs = [ServeConfig(tp or 1, r or 1, *rest) for tp, r, *rest in itertools.product(*grid)]
    device = ns.device if ns.device != "auto" else ("cuda" if local_gpus() else "cpu")
    table = PriceTable.load(Path(ns.prices) if ns.prices else None)
    workload = {k: getattr(ns, k) for k in ("api", "input_len", "output_len", "dataset", "prefix_len",
                                            "num_prefixes", "tokenizer", "ignore_eos", "temperature", "seed")}  # fmt: skip
    if ns.min_requests < 1 or ns.max_concurrency < 1:
        raise BenchUsageError("--min-requests and --max-concurrency must be >= 1")
    check_workload(ns)
    return SweepPlan(model=ns.model, device=device, configs=configs, slo=parse_slo(ns.slo) or parse_slo(DEFAULT_SLO),
                     percentile=ns.slo_percentile, min_requests=ns.min_requests, max_concurrency=ns.max_concurrency,
                     bisect_steps=ns.bisect_steps, workload=workload,
                     pricing=choose_pricing(table, ns.instance, ns.price_per_hour),
                     pinning=Pinning.choose(ns.pin, sorted(os.sched_getaffinity(0))),
                     serve_args=tuple(ns.serve_arg), load_timeout_s=ns.load_timeout)  # fmt: skip


def print_plan(plan: Any, ns: argparse.Namespace) -> None:
    from lmserve.bench.datasets import parse_range
    from lmserve.bench.search import requests_for

    output_len = sum(parse_range("--output-len", ns.output_len)) / 2
    total = 0.0
    print(f"lmserve recommend {plan.model or '(the default model)'}: {len(plan.configs)} configuration(s) on {plan.device}; "
          f"SLO p{plan.percentile} {plan.slo}; {plan.pinning.note}")  # fmt: skip
    print(f"price: {plan.pricing.hourly:g} {plan.pricing.currency}/hour ({plan.pricing.label}: {plan.pricing.why})")
    stale = plan.pricing.warning()
    if stale:
        print(f"warning: {stale}")
    for config in plan.configs:
        levels = plan.levels_bound(config)
        # A level lasts about (requests / concurrency) rounds of one request each.
        seconds = ns.assume_startup_s + sum(
            math.ceil(requests_for(max(c, 1), plan.min_requests) / max(c, 1)) * output_len * ns.assume_tpot_ms / 1000
            for c in levels)  # fmt: skip
        total += seconds
        print(f"  {config.key:<28} up to {len(levels):>2} load levels, at most ~{seconds / 60:5.1f} min")
    print(f"estimated at most ~{total / 60:.1f} min (assuming {ns.assume_startup_s:g} s per start and "
          f"{ns.assume_tpot_ms:g} ms per output token; the search usually stops sooner)")  # fmt: skip


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def recommend_main(ns: argparse.Namespace) -> int:
    from lmserve.bench.recommend_report import write_csv, write_html, write_properties
    from lmserve.bench.sweep import run_sweep

    plan = build_plan(ns)
    if ns.dry_run:
        print_plan(plan, ns)
        return 0
    # A terminated sweep unwinds like Ctrl-C, so the running server is stopped, not orphaned; the
    # configurations measured so far are already in results.json and a rerun resumes after them.
    signal.signal(signal.SIGTERM, _interrupt)
    out_dir = Path(ns.output_dir or f"recommend-{Path(ns.model.rstrip('/')).name if ns.model else 'default-model'}")
    print_plan(plan, ns)
    ranked = run_sweep(plan, ns, out_dir, ns.fresh, lambda line: print(line, flush=True))
    write_csv(out_dir / "results.csv", ranked)
    write_html(out_dir / "report.html", plan, ranked)
    winners = [r for r in ranked if r.get("status") == "ok"]
    if winners:
        write_properties(out_dir / "serving.properties", plan, winners[0])
        w = winners[0]
        print(f"best: {w['key']}: {w['at_max']['requests_per_min']:.1f} requests/min, "
              f"{w['at_max']['output_tokens_per_s']:.1f} output tokens/s, "
              f"{w['cost']['per_million_output_tokens']:.4f} {plan.pricing.currency} per million output tokens")  # fmt: skip
    else:
        print("no configuration met the SLO; see report.html")
    print(f"wrote {out_dir}/results.json, results.csv, report.html" + (", serving.properties" if winners else ""))
    return 0 if winners else 1
