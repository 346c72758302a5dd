"""What ``lmserve bench`` shows and writes: a progress bar, a console table, JSON and CSV."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmserve.bench.metrics import Summary
from lmserve.bench.records import RequestRecord
from lmserve.bench.runner import RunResult

CSV_FIELDS = ("index", "send_s", "end_s", "e2e_ms", "ttft_ms", "tpot_ms", "prompt_tokens", "cached_tokens",
              "output_tokens", "chunks", "error", "error_detail", "resent")  # fmt: skip


class ProgressBar:
    """A progress bar redrawn from the completion callback, at most twice a second: no refresh
    thread waking up on its own while the benchmark runs."""

    def __init__(self, total: int, console: Console, enabled: bool) -> None:
        self.enabled, self._last = enabled, 0.0
        self.progress = Progress(TextColumn("requests"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(),
                                 console=console, auto_refresh=False, transient=True)  # fmt: skip
        self.task = self.progress.add_task("bench", total=total, errors=0)
        self.errors = 0

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def advance(self, record: RequestRecord) -> None:
        self.errors += not record.ok
        self.progress.update(self.task, advance=1, errors=self.errors)
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.5:
            self._last = now
            self.progress.refresh()


def summary_table(summary: Summary, result: RunResult, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name in ("mean", "p50", "p90", "p95", "p99"):
        table.add_column(name, justify="right")
    for label, stats in (("TTFT (ms)", summary.ttft_ms), ("TPOT (ms)", summary.tpot_ms),
                         ("ITL (ms)", summary.itl_ms), ("e2e (ms)", summary.e2e_ms)):  # fmt: skip
        table.add_row(label, *(f"{stats.get(n):.1f}" for n in ("mean", "p50", "p90", "p95", "p99")))
    table.add_section()
    rows = [
        ("requests", f"{summary.completed} ok, {summary.failed} failed" +
         (f" ({', '.join(f'{k}: {v}' for k, v in summary.errors.items())})" if summary.errors else "")),
        ("duration (s)", f"{summary.duration_s:.2f}"),
        ("requests/s", f"{summary.request_throughput:.2f}"),
        ("output tokens/s", f"{summary.output_token_throughput:.1f}"),
        ("total tokens/s", f"{summary.total_token_throughput:.1f}"),
    ]  # fmt: skip
    if summary.cached_prompt_tokens:  # a repeated prompt, or a shared prefix: no prefill measured for it
        share = summary.cached_prompt_tokens / max(1, summary.total_prompt_tokens)
        rows.append(("prompt tokens cached", f"{summary.cached_prompt_tokens} of {summary.total_prompt_tokens} "
                                             f"({share:.0%}) came from the server's prefix cache"))
    if summary.slo:
        slo = ", ".join(f"{k}<={v:g}" for k, v in summary.slo.items())
        rows.append(("goodput (req/s)", f"{summary.goodput:.2f} ({summary.good}/{summary.num_requests} met {slo})"))
    rows.append(("bench CPU", f"{result.cpu_percent:.1f}% of one core ({result.cpu_s:.2f} s)"))
    for label, value in rows:
        table.add_row(label, value, end_section=False)
    return table


def report_json(summary: Summary, result: RunResult, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": config,
        "summary": summary.to_json(),
        "bench_cpu": {"cpu_s": result.cpu_s, "wall_s": result.wall_s, "percent_of_one_core": result.cpu_percent},
        "requests": [r.to_json() for r in result.records],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def write_csv(path: Path, records: list[RequestRecord]) -> None:
    """One row per request: its raw times (s from the start) and derived latencies (ms)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def ms(value: float | None) -> str:
        return "" if value is None else f"{value * 1000:.3f}"

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in records:
            writer.writerow([r.index, f"{r.send:.6f}", f"{r.end:.6f}", ms(r.e2e), ms(r.ttft), ms(r.tpot),
                             r.prompt_tokens if r.prompt_tokens is not None else "",
                             r.cached_tokens if r.cached_tokens is not None else "", r.output_tokens,
                             len(r.chunks), r.error or "", r.error_detail or "", int(r.resent)])  # fmt: skip
