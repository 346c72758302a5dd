"""benchmarks/gpu_throughput.py's smoke mode: the whole script on a tiny random model on the CPU, so
the GPU run's code path (model writing, the step-by-step engine drive, the table) is exercised here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


def test_smoke_prints_a_row_per_run_with_numbers(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_throughput", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["gpu_throughput.py", "--smoke", "--no-hf"])
    module.main()
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert [row.split(" | ")[0] for row in table] == ["| tiny x6", "| tiny batch-1"]
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0  # lmserve tok/s
        assert float(cells[4]) > 0 and float(cells[7]) > 0  # decode step and roofline, ms
    assert table[1].split("|")[6].strip() == "1"  # the batch-1 row decoded one sequence per step
