#!/usr/bin/env bash
# Issue 13: data-parallel pure-bf16 training on every GPU of this machine
# (tools/data_parallel.py, Keras 3 JAX backend, keras.distribution.DataParallel,
# NCCL underneath). See docs/bench_gpu.md, "Two GPUs (issue 13)".
#
# Runs in the repository root of the device machine (JAX with CUDA, no TensorFlow)
# with Keras's wheels in .whl/ (tools/h200/README.md). Writes data_parallel.log,
# data_parallel.json and nvidia-smi.txt to $OUT (or out/two_gpu if $OUT is unset).
# On one GPU it runs the one-GPU half and says that the multi-GPU half was not run;
# on two it runs everything. At most ~3 minutes on one H200: the Python step is
# stopped after LIMIT seconds (default 160; killed 10 s later) and starts no new variant after BUDGET
# seconds (default 110); give two GPUs more (e.g. LIMIT=560 BUDGET=420).
# Also runs on CPU host devices: SIZE=tiny JAX_PLATFORMS=cpu
# XLA_FLAGS=--xla_force_host_platform_device_count=2 bash tools/h200/two_gpu.sh
set -u
# NVLink multicast stays off (KINDS.md: it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/two_gpu}"
SIZE="${SIZE:-h200}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
stamp() { date +%H:%M:%S; }

source tools/h200/keras_from_wheels.sh
(nvidia-smi -L; nvidia-smi topo -m) > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "[$(stamp)] $("$PYTHON" --version 2>&1); NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE; $(grep -c '^GPU' "$OUT/nvidia-smi.txt") GPU(s)"

timeout -k 10 "${LIMIT:-160}" "$PYTHON" tools/data_parallel.py --size "$SIZE" --out "$OUT" \
  --budget "${BUDGET:-110}" 2>&1 | grep -v "^WARNING: All log\|^I0000" | tee "$OUT/data_parallel.log"
echo "[$(stamp)] exit status ${PIPESTATUS[0]}; results in $OUT"
