"""examples/seed_journey.py runs as a user would run it, and prints its predictions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed_journey.py"


@pytest.mark.slow
@pytest.mark.default_model
def test_seed_journey_prints_predictions_and_leaves_nothing_running(default_model_dir: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=900, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "== smollm2 ==" in out and "== gptj-tp2 ==" in out
    predictions = [line for line in out.splitlines() if line.startswith("predict: {'generated_text': ")]
    assert len(predictions) == 2
    assert "Paris" in predictions[0]  # the default model knows this one; the random GPT-J does not
    assert out.count("deleted endpoint") == 2
    from lmserve.sdk import list_endpoints

    assert list_endpoints() == []
