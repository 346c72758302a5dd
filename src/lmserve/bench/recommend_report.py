"""What ``lmserve recommend`` writes: results.csv, the winner's serving.properties, report.html.

The report is one self-contained HTML file: charts are inline SVG drawn by matplotlib, so it reads
offline and needs no script or network.
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Any

from lmserve.bench.launch import ServeConfig
from lmserve.bench.sweep import SweepPlan

CSV_FIELDS = ("rank", "key", "status", "tensor_parallel_degree", "replicas", "max_rolling_batch_size",
              "max_rolling_batch_prefill_tokens", "dtype", "batch_size", "max_batch_delay", "max_concurrency",
              "requests_per_min", "output_tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms",
              "tpot_p50_ms", "tpot_p95_ms", "tpot_p99_ms", "e2e_p50_ms", "e2e_p95_ms", "e2e_p99_ms",
              "cost_per_hour", "cost_per_1k_requests", "cost_per_million_output_tokens",
              "server_cpu_percent", "server_rss_mib", "bench_cpu_percent", "startup_s")  # fmt: skip


def write_csv(path: Path, ranked: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for i, r in enumerate(ranked, 1):
            cost = {f"cost_{k}": v for k, v in (r.get("cost") or {}).items()}
            writer.writerow({"rank": i if r.get("status") == "ok" else "", "key": r["key"], "status": r["status"],
                             **r["config"], "max_concurrency": r.get("max_concurrency", ""),
                             **(r.get("at_max") or {}), **cost, "startup_s": r.get("startup_s", "")})  # fmt: skip


def write_properties(path: Path, plan: SweepPlan, winner: dict[str, Any]) -> None:
    config = ServeConfig(**winner["config"])
    at, cost = winner["at_max"], winner["cost"]
    slo = ", ".join(f"p{plan.percentile} {k} <= {v:g}" for k, v in plan.slo.items())
    lines = [f"# lmserve recommend: the best configuration under {slo}",
             f"# {at['requests_per_min']:.1f} requests/min, {at['output_tokens_per_s']:.1f} output tokens/s, "
             f"{cost['per_million_output_tokens']:.4f} {plan.pricing.currency} per million output tokens on "
             f"{plan.pricing.label}"]  # fmt: skip
    lines += [f"{k}={v}" for k, v in config.properties(plan.model, plan.device).items()]
    path.write_text("\n".join(lines) + "\n")


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def charts(plan: SweepPlan, results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, inline SVG) of the latency-vs-throughput curves and the cost bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, selectable
    q = f"p{plan.percentile}"
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (metric, label) in zip(axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")), strict=True):
        for r in results:
            points = sorted((lv["summary"]["output_token_throughput"], lv["summary"][metric][q], lv["concurrency"])
                            for lv in r.get("levels", []) if lv["summary"]["completed"])  # fmt: skip
            if points:
                line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=r["key"])[0]
                for x, y, c in points:
                    ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7,
                                color=line.get_color())  # fmt: skip
        if metric in plan.slo:
            ax.axhline(plan.slo[metric], color="crimson", linestyle="--", label=f"SLO {label} {plan.slo[metric]:g} ms")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{q} {label} (ms)")
        ax.set_title(f"{q} {label} against throughput (labels: concurrency)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out.append(("Latency against throughput, one curve per configuration", _svg(fig)))
    plt.close(fig)
    ok = [r for r in results if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.45 * max(1, len(ok))))
    if ok:
        values = [r["cost"]["per_million_output_tokens"] for r in ok]
        ax.barh([r["key"] for r in ok], values, color="tab:blue")
        for y, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (v, y), textcoords="offset points", xytext=(3, -3), fontsize=8)
        ax.invert_yaxis()
    ax.set_xlabel(f"{plan.pricing.currency} per million output tokens at the max load meeting the SLO")
    ax.set_title("cost per million output tokens (lower is better)")
    out.append(("Cost", _svg(fig)))
    plt.close(fig)
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def write_html(path: Path, plan: SweepPlan, ranked: list[dict[str, Any]]) -> None:
    q = f"p{plan.percentile}"
    slo = ", ".join(f"{q} {k.removesuffix('_ms').upper()} &le; {v:g} ms" for k, v in plan.slo.items())
    rows = []
    for i, r in enumerate(ranked, 1):
        at, cost = r.get("at_max") or {}, r.get("cost") or {}
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            i if r.get("status") == "ok" else "-", html.escape(r["key"]), html.escape(r["status"]),
            _fmt(r.get("max_concurrency")), _fmt(at.get("requests_per_min")), _fmt(at.get("output_tokens_per_s")),
            _fmt(at.get(f"ttft_{q}_ms")), _fmt(at.get(f"tpot_{q}_ms")), _fmt(at.get(f"e2e_{q}_ms")),
            _fmt(cost.get("per_hour"), 4), _fmt(cost.get("per_1k_requests"), 4),
            _fmt(cost.get("per_million_output_tokens"), 4), _fmt(at.get("server_cpu_percent"), 0),
            _fmt(at.get("server_rss_mib"), 0))) + "</tr>")  # fmt: skip
    pricing = plan.pricing
    price_note = (f"{pricing.hourly:g} {pricing.currency}/hour: {html.escape(pricing.label)} ({html.escape(pricing.why)}"
                  + (f"; price table of {html.escape(pricing.table_date)}" if pricing.table_date else "") + ")"
                  + (f" <strong>Warning: {html.escape(stale)}.</strong>" if (stale := pricing.warning()) else ""))  # fmt: skip
    figures = "".join(f"<figure><figcaption>{html.escape(t)}</figcaption>{svg}</figure>" for t, svg in charts(plan, ranked))
    w = plan.workload
    model = plan.model or "the default model"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lmserve recommend: {html.escape(model)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:70em}}table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:.25em .5em;text-align:right}}td:nth-child(2),td:nth-child(3){{text-align:left}}
figure{{margin:1em 0}}figcaption{{font-weight:bold}}svg{{max-width:100%;height:auto}}</style></head><body>
<h1>lmserve recommend: {html.escape(model)}</h1>
<p>SLO: {slo}, no failed request. Workload: {html.escape(w['api'])}, {html.escape(str(w['input_len']))} prompt tokens,
{html.escape(str(w['output_len']))} output tokens, dataset {html.escape(w['dataset'])}; at least {plan.min_requests}
requests per load level. Device: {html.escape(plan.device)}. Price: {price_note}. Cores: {html.escape(plan.pinning.note)}.</p>
<h2>Ranking</h2><table><tr><th>rank</th><th>configuration</th><th>status</th><th>max concurrency</th>
<th>requests/min</th><th>output tokens/s</th><th>{q} TTFT ms</th><th>{q} TPOT ms</th><th>{q} e2e ms</th>
<th>cost/hour</th><th>cost/1k requests</th><th>cost/M output tokens</th><th>server CPU %</th><th>server MiB</th></tr>
{''.join(rows)}</table>
<h2>Charts</h2>{figures}
</body></html>
"""
    path.write_text(page)
