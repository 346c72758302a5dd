#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only) from the llama.cpp source vendored in the PyPI
# sdist of llama-cpp-python, for benchmarks/vs_llama_cpp.py. Idempotent: a finished build is
# left alone; an interrupted one resumes where cmake stopped.
#
#   benchmarks/peers/build_llama_server.sh            # -> bench_results/llama.cpp/bin/llama-server
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 JOBS=2 benchmarks/peers/build_llama_server.sh
#
# The build is portable (GGML_NATIVE=OFF) with the x86 SIMD extensions this CPU reports in
# /proc/cpuinfo switched on explicitly. AMX is always off: ggml's AMX code faults on some
# machines, and the comparison should measure llama.cpp as most users run it (AVX2/AVX-512).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${LLAMA_SERVER_DIR:-$ROOT/bench_results/llama.cpp}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
BIN="$OUT/bin/llama-server"

if [[ -x "$BIN" ]]; then
    echo "llama-server already built: $BIN"
    exit 0
fi
mkdir -p "$OUT"
SRC="$OUT/llama_cpp_python-$VERSION"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    "$PYTHON" -m pip download --no-binary :all: --no-deps \
        "llama-cpp-python==$VERSION" -d "$OUT/sdist"
    tar -xzf "$OUT/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$OUT"
fi

flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
SIMD=(
    -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)"
    -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)"
    -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)"
    -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)"
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
echo "SIMD flags: ${SIMD[*]}"

# No network at build time (no prebuilt web UI download, no HTTPS client), no tests/examples.
cmake -S "$SRC/vendor/llama.cpp" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    "${SIMD[@]}"
cmake --build "$OUT/build" --config Release --target llama-server -j "$JOBS"
mkdir -p "$OUT/bin"
cp "$OUT/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "built $BIN"
