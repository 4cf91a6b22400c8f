#!/usr/bin/env bash
# The H200 run of issue 9 item 5, in one command from the repository root
# (no TensorFlow there; torch 2.11, nvcc 13.0, 16 cores):
#   1. builds the harness with nvcc for sm_90 (cc/harness/build.sh);
#   2. runs it at 2^28 elements (268M parameters) for every op x rounding x
#      dtype, dense and sparse, plus SGD-momentum at 10^9 elements: bit-for-bit
#      check against the host math, CUDA-event medians against a device copy
#      of the same bytes;
#   3. times the PyTorch peers (cc/harness/torch_peers.py), with torchao and
#      optimi from the wheels in .whl/ (cc/harness/fetch_wheels.sh) if carried.
# Everything it prints goes to $OUT (default out/h200): build.log,
# harness.txt, harness.json, torch_peers.txt, torch_peers.json, env.txt.
# The harness also prints its times against the first H200 run
# (docs/h200/harness.json). A failing stage is reported and the next one still
# runs. About 6 minutes. tools/h200/run_all.sh runs this and the XLA and JAX
# GPU checks in one call (docs/bench_gpu.md).
set -x
export PYTHONUNBUFFERED=1
OUT="${OUT:-out/h200}"
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
stamp() { echo "=== $(date +%H:%M:%S) $*"; }

stamp env
{ nvidia-smi; nvcc --version; python3 -c 'import torch; print("torch", torch.__version__)'; nproc; free -g; git log --oneline -1; } > "$OUT/env.txt" 2>&1

stamp build
bash cc/harness/build.sh /tmp/bf16_harness gpu > "$OUT/build.log" 2>&1 \
    || { stamp "BUILD FAILED"; tail -40 "$OUT/build.log"; }
tail -3 "$OUT/build.log"

stamp harness
if [ -x /tmp/bf16_harness ]; then
    timeout 330 /tmp/bf16_harness --log2n 28 --big 1000000000 --reps 20 \
        --baseline docs/h200/harness.json --json "$OUT/harness.json" 2>&1 | tee "$OUT/harness.txt"
    stamp "harness exit ${PIPESTATUS[0]}"
fi

stamp torch peers
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
timeout 200 python3 cc/harness/torch_peers.py --log2n 28 --reps 20 \
    --json "$OUT/torch_peers.json" 2>&1 | tee "$OUT/torch_peers.txt"
stamp "torch peers exit ${PIPESTATUS[0]}"
grep -E "bf16_harness: |torch_peers: " "$OUT/harness.txt" "$OUT/torch_peers.txt"
stamp done
