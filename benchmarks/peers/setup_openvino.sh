#!/usr/bin/env bash
# A virtual environment for the OpenVINO GenAI system of benchmarks/offline_throughput.py.
# Idempotent: rerunning it checks the pins and exits quickly when they are all there.
#
#   benchmarks/peers/setup_openvino.sh        # -> bench_results/ov-venv/bin/python
#
# Its own environment keeps OpenVINO's libraries (and optimum-intel's pin on transformers) out of
# lmserve's. The export to OpenVINO IR needs torch; rather than pulling a multi-GB CUDA build from
# the package index, torch is borrowed from the Python that runs this script (PYTHON, default
# python3) through symlinks, when that Python has it. The benchmark itself imports no torch there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${OV_VENV:-$ROOT/bench_results/ov-venv}"
PYTHON="${PYTHON:-python3}"
PINS=(
    openvino==2026.4.1 openvino-genai==2026.4.1.0 openvino-tokenizers==2026.4.1.0
    optimum-intel==2.2.0 optimum==2.3.0 nncf==3.4.0 "transformers>=4.51,<5.6"
)
STAMP="$VENV/.lmserve-pins"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${PINS[*]}" && -x "$VENV/bin/python" ]]; then
    echo "OpenVINO environment ready: $VENV/bin/python"
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
VPY="$VENV/bin/python"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# Borrow torch (and its compiled parts) from $PYTHON when it has one; a constraint keeps pip from
# replacing it with another build.
CONSTRAINTS="$VENV/constraints.txt"
: > "$CONSTRAINTS"
TORCH_SITE="$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__path__[0]))' 2>/dev/null || true)"
if [[ -n "$TORCH_SITE" ]]; then
    for entry in "$TORCH_SITE"/torch "$TORCH_SITE"/torchgen "$TORCH_SITE"/functorch "$TORCH_SITE"/torch-*.dist-info; do
        [[ -e "$entry" ]] && ln -sfn "$entry" "$SITE/$(basename "$entry")"
    done
    TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')"
    echo "torch==$TORCH_VERSION" >> "$CONSTRAINTS"
    echo "borrowed torch $TORCH_VERSION from $TORCH_SITE"
fi

"$VPY" -m pip install --disable-pip-version-check -q --upgrade pip
"$VPY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" "${PINS[@]}"
# optimum-intel requires torchvision, but the index's build does not load against a borrowed CPU
# torch ("operator torchvision::nms does not exist"), and transformers then fails to import at all.
# Text-model export never uses it: remove it when it is broken.
if ! "$VPY" -c 'import torchvision' 2>/dev/null; then
    "$VPY" -m pip uninstall --disable-pip-version-check -y -q torchvision
fi
"$VPY" -c 'import openvino_genai, optimum.intel, transformers.modeling_utils; print("openvino_genai", openvino_genai.__version__)'
echo "${PINS[*]}" > "$STAMP"
echo "OpenVINO environment ready: $VPY"
