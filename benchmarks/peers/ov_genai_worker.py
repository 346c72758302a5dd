"""The OpenVINO GenAI side of the offline benchmark; runs inside the OpenVINO virtual environment.

Kept free of lmserve imports: that environment has OpenVINO, optimum-intel and their pins, not
lmserve's dependencies. Two commands:

    python ov_genai_worker.py export HF_DIR IR_DIR     # OpenVINO IR, fp16 weights, no compression
    python ov_genai_worker.py run IR_DIR JOB.json      # prints one JSON line: tokens, seconds, ids

JOB.json holds ``prompts`` and ``warmup`` (lists of token ids), ``new_tokens``, ``max_num_seqs``,
``max_batched_tokens``, ``cache_gb``, ``threads`` (0: OpenVINO's default).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def export(hf_dir: str, ir_dir: str) -> None:
    """Export with optimum-intel's own exporter, as OpenVINO's documentation does.

    ``--weight-format fp16`` asks for uncompressed weights: left to itself, optimum compresses models
    over a billion parameters to int8. fp16 holds a bf16 checkpoint's N(0, 0.02) weights, or the
    default model's dequantized ones, at least as precisely as bf16, and the CPU plugin computes in bf16.
    """
    command = [str(Path(sys.executable).with_name("optimum-cli")), "export", "openvino",
               "--model", hf_dir, "--task", "text-generation-with-past", "--weight-format", "fp16", ir_dir]
    subprocess.run(command, check=True)


def run(ir_dir: str, job_path: str) -> None:
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    job = json.loads(Path(job_path).read_text())
    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = int(job["cache_gb"])
    scheduler.max_num_seqs = int(job["max_num_seqs"])
    scheduler.max_num_batched_tokens = int(job["max_batched_tokens"])
    scheduler.dynamic_split_fuse = True
    scheduler.enable_prefix_caching = False
    # bf16 compute and a bf16 KV cache: the CPU plugin's default KV precision is u8 (compressed),
    # which would compare a lossy cache against lmserve's exact one. Keys and values have their own
    # settings too; set all three so neither falls back to its default.
    properties: dict[str, object] = {"KV_CACHE_PRECISION": "bf16", "KEY_CACHE_PRECISION": "bf16",
                                     "VALUE_CACHE_PRECISION": "bf16", "INFERENCE_PRECISION_HINT": "bf16"}
    if job.get("threads"):
        properties["INFERENCE_NUM_THREADS"] = int(job["threads"])
    pipe = ov_genai.ContinuousBatchingPipeline(ir_dir, scheduler, "CPU", properties)

    def config(n: int) -> ov_genai.GenerationConfig:
        cfg = ov_genai.GenerationConfig()
        cfg.max_new_tokens = n
        cfg.min_new_tokens = n
        cfg.ignore_eos = True
        cfg.do_sample = False
        return cfg

    prompts = [ov.Tensor(np.array([p], dtype=np.int64)) for p in job["prompts"]]
    warmup = [ov.Tensor(np.array([p], dtype=np.int64)) for p in job["warmup"]]  # the same as every system's
    pipe.generate(warmup, [config(2)] * len(warmup))
    n = int(job["new_tokens"])
    start = time.perf_counter()
    results = pipe.generate(prompts, [config(n)] * len(prompts))
    seconds = time.perf_counter() - start
    ids = [list(r.m_generation_ids[0]) for r in results]
    print(json.dumps({"tokens": sum(map(len, ids)), "seconds": seconds, "ids": ids,
                      "openvino_genai": ov_genai.__version__}))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("export", "run"):
        sys.exit(__doc__)
    export(sys.argv[2], sys.argv[3]) if sys.argv[1] == "export" else run(sys.argv[2], sys.argv[3])
