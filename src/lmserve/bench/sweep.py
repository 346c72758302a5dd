"""``lmserve recommend``: sweep configurations, find each one's max load under the SLO, price, rank.

State lives in the output directory: ``results.json`` is rewritten after every configuration, so an
interrupted sweep started again with the same directory and plan skips what it already measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve.bench import BenchUsageError
from lmserve.bench.bench import PromptStream
from lmserve.bench.dialects import Dialect
from lmserve.bench.launch import ServeConfig, ServerProcess, ServerStartError
from lmserve.bench.metrics import summarize
from lmserve.bench.prices import Pricing, costs
from lmserve.bench.runner import LoadSpec, run_load
from lmserve.bench.search import Level, find_max_load, level_passes, requests_for

RESULTS_VERSION = 1


@dataclass(frozen=True)
class Pinning:
    """Cores for the server and for the load generator; ``None`` when not pinned, with why."""

    server: tuple[int, ...] | None
    bench: tuple[int, ...] | None
    note: str

    @classmethod
    def choose(cls, mode: str, cores: list[int]) -> Pinning:
        """``auto`` pins the load generator to the last core and the server to the rest when there are
        at least 4 cores; on fewer, taking a core from the server would change what is measured."""
        if mode == "off" or (mode == "auto" and len(cores) < 4):
            why = "--pin off" if mode == "off" else f"only {len(cores)} cores: the server keeps them all"
            return cls(None, None, f"not pinned ({why}); the load generator's own CPU use is reported per level")
        if len(cores) < 2:
            raise BenchUsageError(f"--pin on needs at least 2 cores, this process may use {len(cores)}")
        server, bench = tuple(cores[:-1]), (cores[-1],)
        where = f"cores {_cores(server)}" if len(server) > 1 else f"core {server[0]}"
        return cls(server, bench, f"server pinned to {where}, load generator to core {bench[0]}")


def _cores(cores: tuple[int, ...]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 and cores[-1] - cores[0] == len(cores) - 1 else ",".join(map(str, cores))


@dataclass
class SweepPlan:
    """Everything that decides what a sweep measures (a resumed sweep must have the same)."""

    model: str | None  # None: lmserve's default model
    device: str
    configs: list[ServeConfig]
    slo: dict[str, float]
    percentile: int
    min_requests: int
    max_concurrency: int
    bisect_steps: int
    workload: dict[str, Any]
    pricing: Pricing
    pinning: Pinning
    serve_args: tuple[str, ...] = ()
    load_timeout_s: float = 1800.0

    def identity(self) -> dict[str, Any]:
        """What must match for a sweep to resume another's results."""
        return {"model": self.model, "device": self.device, "slo": self.slo, "percentile": self.percentile,
                "min_requests": self.min_requests, "max_concurrency": self.max_concurrency,
                "bisect_steps": self.bisect_steps, "workload": self.workload, "serve_args": list(self.serve_args)}  # fmt: skip

    def levels_bound(self, config: ServeConfig) -> list[int]:
        """Concurrencies the search may visit, at most (for the dry run's estimate)."""
        top = min(config.max_in_flight, self.max_concurrency)
        if top <= 1:
            return [1]
        doubling = [c for c in (2**k for k in range(1, 16)) if c < top]
        return [1, top, *doubling] + [max(2, top // 2)] * self.bisect_steps


@dataclass
class SweepState:
    plan: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load_or_new(cls, path: Path, plan: SweepPlan, fresh: bool) -> SweepState:
        identity = json.loads(json.dumps(plan.identity()))  # as it reads back from JSON
        if fresh or not path.exists():
            return cls(identity)
        data = json.loads(path.read_text())
        if data.get("plan") != identity:
            changed = sorted(k for k in identity if data.get("plan", {}).get(k) != identity[k])
            raise BenchUsageError(f"{path} holds a sweep with another plan (differs in: {', '.join(changed)}); "
                                  "use another --output-dir or --fresh to start over")  # fmt: skip
        return cls(identity, list(data.get("configurations", [])))

    def done(self) -> set[str]:
        return {r["key"] for r in self.results}


def measure_configuration(plan: SweepPlan, config: ServeConfig, ns: argparse.Namespace, out_dir: Path,
                          say: Callable[[str], None]) -> dict[str, Any]:
    """Start the server for ``config``, search its max load under the SLO, price it."""
    from lmserve.bench.dialects import dialect

    entry: dict[str, Any] = {"key": config.key, "config": config.to_json(), "levels": []}
    server_cores = set(plan.pinning.server) if plan.pinning.server else None
    with ServerProcess(plan.model, config, plan.device, out_dir / "logs" / f"{config.key}.log", server_cores,
                       plan.serve_args) as server:  # fmt: skip
        try:
            entry["startup_s"] = server.wait_ready(plan.load_timeout_s)
        except ServerStartError as exc:
            say(f"  {config.key}: did not start: {str(exc).splitlines()[0]}")
            return entry | {"status": "failed to start", "error": str(exc)}
        api = dialect(ns.api)
        # Every load level sends prompts that no earlier one (nor the warm-up) sent: the server's
        # prefix cache keeps what it computed, and a level that found its prompts there would skip
        # their prefill and pass at a load it cannot carry with new traffic.
        stream = PromptStream(ns)
        asyncio.run(run_load(_spec(server.url, api, ns, 1), stream.take(2)))  # warm-up

        def measure(concurrency: int) -> Level:
            prompts = stream.take(requests_for(concurrency, plan.min_requests))
            cpu0, t0 = server.cpu_seconds(), time.perf_counter()
            result = asyncio.run(run_load(_spec(server.url, api, ns, concurrency), prompts))
            wall = time.perf_counter() - t0
            usage = {"cpu_percent": 100 * (server.cpu_seconds() - cpu0) / wall, "rss_mib": server.rss_mib()}
            summary = summarize(result.records, plan.slo)
            level = Level(concurrency, summary, level_passes(summary, plan.slo, plan.percentile), usage,
                          result.cpu_percent)  # fmt: skip
            p = f"p{plan.percentile}"
            say(f"  {config.key} concurrency {concurrency:>4}: {summary.output_token_throughput:8.1f} tok/s, "
                f"TTFT {p} {summary.ttft_ms.get(p):8.1f} ms, TPOT {p} {summary.tpot_ms.get(p):7.1f} ms, "
                f"{summary.failed} failed -> {'meets' if level.passed else 'misses'} the SLO")  # fmt: skip
            return level

        best, levels = find_max_load(measure, min(config.max_in_flight, plan.max_concurrency), plan.bisect_steps)
    entry["levels"] = [level.to_json() for level in levels]
    entry["max_concurrency"] = best
    if best == 0:
        return entry | {"status": "misses the SLO at concurrency 1"}
    at = next(level for level in levels if level.concurrency == best)
    s = at.summary
    entry |= {"status": "ok", "at_max": {
        "requests_per_min": s.request_throughput * 60, "output_tokens_per_s": s.output_token_throughput,
        **{f"{m}_{q}_ms": getattr(s, f"{m}_ms").get(q) for m in ("ttft", "tpot", "e2e") for q in ("p50", "p95", "p99")},
        "server_cpu_percent": at.server.get("cpu_percent"), "server_rss_mib": at.server.get("rss_mib"),
        "bench_cpu_percent": at.bench_cpu_percent,
    }, "cost": costs(plan.pricing.hourly, s.request_throughput, s.output_token_throughput)}  # fmt: skip
    return entry


def _spec(url: str, api: Dialect, ns: argparse.Namespace, concurrency: int) -> LoadSpec:
    return LoadSpec(url=url, dialect=api, ignore_eos=ns.ignore_eos, temperature=ns.temperature,
                    concurrency=concurrency, timeout_s=ns.timeout, seed=ns.seed)  # fmt: skip


def rank(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Configurations meeting the SLO first, cheapest per million output tokens first (then the most
    requests per minute); the others after, in sweep order."""
    ok = [r for r in results if r.get("status") == "ok"]
    ok.sort(key=lambda r: (r["cost"]["per_million_output_tokens"], -r["at_max"]["requests_per_min"]))
    return ok + [r for r in results if r.get("status") != "ok"]


def run_sweep(plan: SweepPlan, ns: argparse.Namespace, out_dir: Path, fresh: bool,
              say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure every configuration not yet in ``out_dir``'s results; returns the ranked results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    state = SweepState.load_or_new(path, plan, fresh)
    before = os.sched_getaffinity(0)
    if plan.pinning.bench:
        os.sched_setaffinity(0, set(plan.pinning.bench))
    try:
        for i, config in enumerate(plan.configs, 1):
            if config.key in state.done():
                say(f"[{i}/{len(plan.configs)}] {config.key}: measured before, kept")
                continue
            say(f"[{i}/{len(plan.configs)}] {config.key}: starting lmserve")
            state.results.append(measure_configuration(plan, config, ns, out_dir, say))
            write_results(path, state, plan, rank(state.results))
    finally:
        os.sched_setaffinity(0, before)
    return rank(state.results)


def write_results(path: Path, state: SweepState, plan: SweepPlan, ranked: list[dict[str, Any]]) -> None:
    data = {"version": RESULTS_VERSION, "plan": state.plan, "pricing": plan.pricing.to_json(),
            "pinning": plan.pinning.note, "configurations": state.results,
            "ranking": [r["key"] for r in ranked]}  # fmt: skip
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
