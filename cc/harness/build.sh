#!/usr/bin/env bash
# Builds the harness (cc/harness/bf16_harness.cu) in one command:
#   cc/harness/build.sh OUTPUT [gpu|host]
# gpu: nvcc (NVCC, else nvcc on PATH, else /usr/local/cuda/bin/nvcc) for
#      HARNESS_ARCH (default 90: the H200), the CUDA kernels of
#      cc/kernels/bf16_update_kernels.cu.h with TensorFlow's GPU library's
#      flags (--fmad=false --ftz=true), the host reference with OpenMP.
# host: g++ as plain C++ (no CUDA needed): kernels::HostEmulator instead of a
#      GPU, for checking the harness and the kernels' thread logic anywhere.
# Without a mode: gpu when an nvcc is found, else host.
# The host code is compiled with -ffp-contract=off in both modes: the
# reference must not fuse multiply-adds either (docs/rounding.md 1).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUTPUT="${1:?usage: build.sh OUTPUT [gpu|host]}"
MODE="${2:-}"
NVCC_BIN="${NVCC:-$(command -v nvcc || true)}"
[ -n "$NVCC_BIN" ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC_BIN=/usr/local/cuda/bin/nvcc; } || true
if [ -z "$MODE" ]; then MODE=$([ -n "$NVCC_BIN" ] && echo gpu || echo host); fi
HOST_FLAGS="-O3,-march=native,-fopenmp,-ffp-contract=off,-fno-math-errno"
if [ "$MODE" = gpu ]; then
    [ -n "$NVCC_BIN" ] || { echo "build.sh: no nvcc (set NVCC)"; exit 1; }
    ARCH="${HARNESS_ARCH:-90}"
    set -x
    "$NVCC_BIN" -std=c++17 -O3 -gencode="arch=compute_${ARCH},code=sm_${ARCH}" \
        --fmad=false --ftz=true -Xcompiler "$HOST_FLAGS" -Xptxas -warn-spills \
        -o "$OUTPUT" "$HERE/bf16_harness.cu" -lgomp
else
    set -x
    "${CXX:-g++}" -std=c++17 ${HOST_FLAGS//,/ } -Wall -Wno-unknown-pragmas -x c++ \
        -o "$OUTPUT" "$HERE/bf16_harness.cu"
fi
