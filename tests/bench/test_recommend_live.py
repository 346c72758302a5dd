"""``lmserve recommend`` end to end on a tiny real model: two configurations, the files, the ranking,
resuming, and the report rendered by headless Chromium."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.bench.conftest import TINY_SERVE_ARGS, run_cli

pytestmark = pytest.mark.slow

SWEEP = ("--max-batch-size", "1,4", "--min-requests", "4", "--max-concurrency", "4", "--bisect-steps", "1",
         "--input-len", "8", "--output-len", "4", "--price-per-hour", "0.5", "--slo", "ttft_ms=600000,tpot_ms=600000",
         *(f"--serve-arg={a}" for a in TINY_SERVE_ARGS))  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("recommend")
    proc = run_cli("recommend", str(tiny_llama), "--output-dir", str(out), *SWEEP)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_two_configurations_ranked_by_cost(sweep: tuple[Path, Any], tiny_llama: Path) -> None:
    out, _ = sweep
    results = json.loads((out / "results.json").read_text())
    by_key = {r["key"]: r for r in results["configurations"]}
    assert set(by_key) == {"tp1-r1-b1", "tp1-r1-b4"} and all(r["status"] == "ok" for r in by_key.values())
    # Batch 1 holds one request: the search stops at concurrency 1; batch 4 is probed at 1 and 4.
    assert [lv["concurrency"] for lv in by_key["tp1-r1-b1"]["levels"]] == [1]
    assert [lv["concurrency"] for lv in by_key["tp1-r1-b4"]["levels"]] == [1, 4]
    for r in by_key.values():
        assert r["cost"]["per_hour"] == 0.5
        assert r["cost"]["per_million_output_tokens"] == pytest.approx(
            0.5 / (r["at_max"]["output_tokens_per_s"] * 3600) * 1e6)
        assert r["at_max"]["server_rss_mib"] > 0 and r["at_max"]["server_cpu_percent"] > 0
    costs = [by_key[k]["cost"]["per_million_output_tokens"] for k in results["ranking"]]
    assert costs == sorted(costs)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["key"] for r in rows] == results["ranking"] and [r["rank"] for r in rows] == ["1", "2"]
    winner = by_key[results["ranking"][0]]
    props = dict(line.split("=", 1) for line in (out / "serving.properties").read_text().splitlines()
                 if not line.startswith("#"))  # fmt: skip
    assert props["option.model_id"] == str(tiny_llama)
    assert props["option.max_rolling_batch_size"] == str(winner["config"]["max_rolling_batch_size"])
    report = (out / "report.html").read_text()
    assert report.count("<svg") == 2 and "tp1-r1-b4" in report and "<script" not in report


def test_a_second_run_resumes_instead_of_measuring_again(sweep: tuple[Path, Any], tiny_llama: Path) -> None:
    out, _ = sweep
    before = (out / "results.json").read_text()
    proc = run_cli("recommend", str(tiny_llama), "--output-dir", str(out), *SWEEP)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("measured before, kept") == 2 and "starting lmserve" not in proc.stdout
    assert json.loads((out / "results.json").read_text())["configurations"] == json.loads(before)["configurations"]
    changed = run_cli("recommend", str(tiny_llama), "--output-dir", str(out), *SWEEP, "--min-requests", "5")
    assert changed.returncode == 2 and "differs in: min_requests" in changed.stderr


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path: Path) -> None:
    proc = run_cli("recommend", "some-model", "--output-dir", str(tmp_path / "x"), "--dry-run", *SWEEP)
    assert proc.returncode == 0, proc.stderr
    assert "tp1-r1-b1" in proc.stdout and "tp1-r1-b4" in proc.stdout and "estimated" in proc.stdout
    assert not (tmp_path / "x").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package 'chromium')")
def test_report_renders_its_charts_in_chromium(sweep: tuple[Path, Any], tmp_path: Path) -> None:
    from PIL import Image

    out, _ = sweep
    shot = tmp_path / "report.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,1400", f"--screenshot={shot}", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    image = Image.open(shot).convert("RGB")
    colors = {color for _, color in image.getcolors(maxcolors=1 << 20) or []}
    # matplotlib's first two series colours and the SLO line: the charts were drawn, not just the text.
    assert {(31, 119, 180), (255, 127, 14), (220, 20, 60)} <= colors
