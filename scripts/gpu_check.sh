#!/usr/bin/env bash
# GPU check, for a CUDA machine, in one go (about 8 minutes): the GPU-marked tests, then
# benchmarks/gpu_throughput.py (lmserve against Hugging Face generate_batch on random-weight models
# shaped like SmolLM2-135M, TinyLlama-1.1B and Llama-2-7B; no downloads).
#
#   scripts/gpu_check.sh                 # uses python3 as it is: it must already hold CUDA torch
#   PYTHON=/path/to/python scripts/gpu_check.sh
#
# Nothing is fetched from the network. The engine, its tests and the benchmark need only torch,
# triton, transformers, tokenizers, safetensors, numpy, jinja2, huggingface_hub, tqdm, filelock,
# psutil and pytest; a package missing from the interpreter can be brought as wheels in
# $WHEELS (default .whl), which are installed --no-index into a private directory first.
#
# Environment: PYTHON (default python3), WHEELS, GPU_TEST_PATHS (default: tests/kernels tests/engine
# tests/models, and tests/replicas where the server's packages are installed), BENCH_SHAPES (default 135m,1.1b,7b), BENCH_ARGS (extra benchmark flags),
# TEST_TIMEOUT (default 240 s), BENCH_TIMEOUT (default 330 s).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
started=$SECONDS
section() { printf '\n=== %s (%ds elapsed)\n' "$1" $((SECONDS - started)); }
status=0

section "interpreter"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  site=$(mktemp -d)/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF' || exit 1
import importlib, sys
import torch
need = ["triton", "transformers", "tokenizers", "safetensors", "numpy", "jinja2", "huggingface_hub", "tqdm",
        "filelock", "psutil", "pytest"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
versions = {m: getattr(importlib.import_module(m), "__version__", "?") for m in ("triton", "transformers")
            if m not in missing}
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, {versions}, "
      f"{torch.cuda.device_count()} device(s): {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
import lmserve
print("lmserve from", lmserve.__file__)
if missing:
    sys.exit(f"missing packages (bring them as wheels in $WHEELS): {missing}")
sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")
EOF

section "GPU-marked tests"
paths=${GPU_TEST_PATHS:-tests/kernels tests/engine tests/models}
# The replica tests start servers: only where the server's packages are there too.
if [[ -z ${GPU_TEST_PATHS:-} ]] && "$PY" -c 'import fastapi, uvicorn, zmq, msgspec, pydantic' 2>/dev/null; then
  paths="$paths tests/replicas"
fi
echo "test paths: $paths"
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=10 $paths || status=1

section "throughput against Hugging Face generate_batch, and the roofline"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-330}" "$PY" benchmarks/gpu_throughput.py --shapes "${BENCH_SHAPES:-135m,1.1b,7b}" \
  ${BENCH_ARGS:-} || status=1

section "done (status $status)"
exit $status
