"""OpenVINO GenAI continuous batching as a system of the offline benchmark (host side).

The work happens in a child process of the OpenVINO virtual environment (``setup_openvino.sh``):
its threads never share a process with lmserve's, and its libraries never meet lmserve's. The model
is exported once per checkpoint to OpenVINO IR, cached beside the environment.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

BENCH_RESULTS = Path(__file__).resolve().parents[2] / "bench_results"
DEFAULT_OV_PYTHON = BENCH_RESULTS / "ov-venv" / "bin" / "python"
WORKER = Path(__file__).with_name("ov_genai_worker.py")
SETUP = Path(__file__).with_name("setup_openvino.sh")


class PeerUnavailable(RuntimeError):
    """A peer system cannot run here; the message says how to set it up."""


def ov_python(path: str | None) -> Path:
    """The OpenVINO environment's interpreter, checked to exist."""
    python = Path(path) if path else DEFAULT_OV_PYTHON
    if not python.is_file():
        raise PeerUnavailable(f"no OpenVINO environment at {python}: run {SETUP.relative_to(SETUP.parents[2])} "
                              f"first (or pass --ov-python)")
    return python


def checkpoint_fingerprint(model_dir: Path) -> str:
    """Identifies a checkpoint by its config and the size and time of its weight files."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def exported_model(model_dir: Path, python: Path) -> Path:
    """The OpenVINO IR of ``model_dir``, exported on first use (fp16 weights, no compression)."""
    out = BENCH_RESULTS / "ov-models" / f"{model_dir.name}-{checkpoint_fingerprint(model_dir)}"
    if (out / "openvino_model.xml").is_file():
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted export
    print(f"  exporting {model_dir} to OpenVINO IR (once) ...", flush=True)
    subprocess.run([str(python), str(WORKER), "export", str(model_dir), str(staging)], check=True)
    staging.rename(out)
    return out


def run_ov_genai(model_dir: Path, prompts: list[list[int]], new_tokens: int, *, python: Path,
                 max_num_seqs: int, max_batched_tokens: int, cache_gb: int, threads: int,
                 warmup: list[list[int]]) -> tuple[int, float, list[list[int]]]:
    """Generate ``new_tokens`` per prompt, greedy with end-of-sequence ignored, after two new tokens
    for each of the ``warmup`` prompts.

    Returns the tokens generated, the seconds it took and each prompt's generated ids.
    """
    ir_dir = exported_model(model_dir, python)
    job = {"prompts": prompts, "warmup": warmup, "new_tokens": new_tokens, "max_num_seqs": max_num_seqs,
           "max_batched_tokens": max_batched_tokens, "cache_gb": cache_gb, "threads": threads}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(job, handle)
        handle.flush()
        done = subprocess.run([str(python), str(WORKER), "run", str(ir_dir), handle.name],
                              check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return int(result["tokens"]), float(result["seconds"]), result["ids"]
