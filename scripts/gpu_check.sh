#!/usr/bin/env bash
# GPU check, for a CUDA machine: a venv with a CUDA build of torch, the GPU-marked tests, and a short
# offline throughput benchmark. Budget: about 8 minutes once the packages are installed.
#
#   scripts/gpu_check.sh                      # makes/uses $VENV (default .venv) with TORCH_SPEC from PyPI
#   PYTHON=python3 scripts/gpu_check.sh       # use an interpreter that already has CUDA torch; no installs
#
# Environment: VENV, TORCH_SPEC (default torch==2.13.0, PyPI's CUDA build on Linux), PYTHON,
# GPU_TEST_PATHS (default: tests), BENCH_MODEL (a model directory; default: the default model, or a
# random model of its shape when it cannot be fetched), BENCH_REQUESTS (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
started=$SECONDS
section() { printf '\n=== %s (%ds elapsed)\n' "$1" $((SECONDS - started)); }

section "interpreter"
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
  export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  VENV=${VENV:-.venv}
  PY=$VENV/bin/python
  [[ -x $PY ]] || python3 -m venv "$VENV"
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    # A CPU build (the Makefile's default on CPU machines) satisfies "torch==X" too: replace it.
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip uninstall -y -q torch 2>/dev/null || true
    "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
  "$PY" -m pip install -q -e '.[test]'
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} device(s): {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")
EOF

section "GPU-marked tests"
# shellcheck disable=SC2086
timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider ${GPU_TEST_PATHS:-tests} -rs

section "offline throughput"
model=${BENCH_MODEL:-}
extra=()
if [[ -z $model ]]; then
  model=$(timeout 120 "$PY" -c 'from lmserve.store.default_model import pull_default_model; print(pull_default_model(progress=False))' 2>/dev/null | tail -1) || model=""
fi
if [[ -z $model ]]; then
  model=$(mktemp -d)/smollm-shaped
  extra=(--no-single-stream)  # the single-stream prompt is made of the default model's token ids
  echo "default model unavailable (offline?): benchmarking a random model of its shape (vocabulary 384) in $model"
  "$PY" - "$model" <<'EOF2'
import sys
from pathlib import Path
from tests.tiny_models import build_tokenizer, VOCAB_SIZE
from transformers import LlamaConfig, LlamaForCausalLM
out = Path(sys.argv[1]); out.mkdir(parents=True)
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=VOCAB_SIZE, max_position_embeddings=2048, tie_word_embeddings=True)
LlamaForCausalLM(cfg).save_pretrained(out)
build_tokenizer(out)
EOF2
fi
# hf-static rather than hf-batch: transformers 5.17's continuous batching failed there ("Inplace update
# to inference tensor outside InferenceMode").
timeout 240 "$PY" benchmarks/offline_throughput.py --model "$model" --systems lmserve,hf-static \
  --num-requests "${BENCH_REQUESTS:-64}" --min-prompt 64 --max-prompt 512 --new-tokens 128 \
  --max-num-seqs 64 --dtype bf16 "${extra[@]}"

section "done"
