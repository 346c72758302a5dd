"""``lmserve bench``: build the workload, run it with a progress bar, report and write the results."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from lmserve.bench import BenchUsageError
from lmserve.bench.datasets import file_prompts, parse_range, random_prompts, shared_prefix_prompts
from lmserve.bench.dialects import Prompt, dialect
from lmserve.bench.metrics import failure_lines, parse_slo, summarize
from lmserve.bench.output import ProgressBar, report_json, summary_table, write_csv, write_json
from lmserve.bench.runner import LoadSpec, run_load
from lmserve.bench.workload_args import check_workload


def build_prompts(ns: argparse.Namespace, n: int) -> list[Prompt]:
    """The workload ``ns`` describes (``n`` prompts)."""
    if n < 1:
        raise BenchUsageError(f"--num-requests must be >= 1, got {n}")
    input_len, output_len = parse_range("--input-len", ns.input_len), parse_range("--output-len", ns.output_len)
    if ns.dataset == "random":
        return random_prompts(n, input_len, output_len, ns.seed, ns.tokenizer)
    if ns.dataset == "shared-prefix":
        return shared_prefix_prompts(n, input_len, output_len, ns.seed, ns.prefix_len, ns.num_prefixes, ns.tokenizer)
    path = Path(ns.dataset)
    if not path.is_file():
        raise BenchUsageError(f"--dataset: {ns.dataset!r} is not random, shared-prefix or an existing JSONL file")
    return file_prompts(path, n, output_len, ns.seed)


class PromptStream:
    """The workload ``ns`` describes as one stream that runs on from call to call: ``take(n)`` gives
    the next ``n`` prompts, none of which an earlier call gave (a ``--dataset`` file wraps around
    once its lines run out). Several measurements against one server draw from it, so that none
    finds the prompts of an earlier one in the server's prefix cache and skips their prefill."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns, self.taken = ns, 0
        self._built: list[Prompt] = []

    def take(self, n: int) -> list[Prompt]:
        end = self.taken + n
        # The workloads are seeded sequences: the first k prompts of a longer one are those of a
        # shorter one, so a longer build continues the stream. Built at least twice as long each
        # time, so a sweep's levels do not rebuild everything before them again and again.
        if len(self._built) < end:
            self._built = build_prompts(self.ns, max(end, 2 * len(self._built)))
        prompts, self.taken = self._built[self.taken:end], end
        return prompts


def load_spec(ns: argparse.Namespace) -> LoadSpec:
    check_workload(ns)
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    return LoadSpec(url=ns.url.rstrip("/"), dialect=dialect(ns.api), model=ns.model, ignore_eos=ns.ignore_eos,
                    temperature=ns.temperature,
                    concurrency=ns.concurrency, request_rate=ns.request_rate, arrival=ns.arrival,
                    burstiness=ns.burstiness, ramp_up_s=ns.ramp_up, max_concurrency=ns.max_concurrency,
                    timeout_s=ns.timeout, seed=ns.seed, headers=headers)  # fmt: skip


def bench_main(ns: argparse.Namespace) -> int:
    slo = parse_slo(ns.slo)
    spec = load_spec(ns)
    spec.check()
    prompts = build_prompts(ns, ns.num_requests + ns.warmup)
    warmup, prompts = prompts[: ns.warmup], prompts[ns.warmup :]
    console = Console(stderr=True)
    if warmup:
        asyncio.run(run_load(LoadSpec(**{**spec.__dict__, "request_rate": None, "concurrency": 1}), warmup))
    with ProgressBar(len(prompts), console, ns.progress and console.is_terminal) as bar:
        result = asyncio.run(run_load(spec, prompts, bar.advance))
    summary = summarize(result.records, slo)
    load = f"concurrency {spec.concurrency}" if spec.mode == "closed" else f"{spec.request_rate:g} req/s {spec.arrival}"
    Console().print(summary_table(summary, result, f"lmserve bench {spec.url} ({spec.dialect.name}, {load})"))
    data = report_json(summary, result, config_of(ns, spec))
    if ns.output_json:
        write_json(Path(ns.output_json), data)
    if ns.output_csv:
        write_csv(Path(ns.output_csv), result.records)
    for line in failure_lines(result.records):
        print(line, file=sys.stderr)
    return 0 if summary.completed else 1


def config_of(ns: argparse.Namespace, spec: LoadSpec) -> dict[str, Any]:
    return {"url": spec.url, "api": spec.dialect.name, "model": spec.model, "mode": spec.mode,
            "concurrency": spec.concurrency if spec.mode == "closed" else spec.max_concurrency,
            "request_rate": spec.request_rate, "arrival": spec.arrival, "burstiness": spec.burstiness,
            "ramp_up_s": spec.ramp_up_s, "num_requests": ns.num_requests, "warmup": ns.warmup,
            "dataset": ns.dataset, "input_len": ns.input_len, "output_len": ns.output_len,
            "ignore_eos": spec.ignore_eos, "temperature": spec.temperature, "seed": spec.seed}  # fmt: skip


