#!/usr/bin/env bash
# Everything tf_bf16 checks on the H200, in one command from the repository root
# (no TensorFlow there: Python 3.12, JAX with CUDA, PyTorch, nvcc 13). Prepared here
# by tools/h200/prepare.sh, which writes what travels (carry):
#   .whl  out/xla_hlo  out/jax_parity_reference
# Stages, each with its own time limit; a failing stage is reported and the next
# one still runs; everything lands in $OUT (default out/h200):
#   0. env.txt: nvidia-smi, nvcc, torch, jax, commit;
#   1. the harness build (cc/harness/build.sh, sm_90), in the background while the
#      two checks below use the GPU: build.log;
#   2. XLA:GPU runs the exported HLO of jit-compiled tf_bf16 train steps
#      (tools/xla_hlo_run_jax.py), with XLA's default flags and without excess
#      precision, against the TensorFlow CPU kernels' bits: xla_hlo.txt,
#      xla_hlo_no_excess_precision.txt;
#   3. tf_bf16 on Keras's JAX backend on the GPU against the CPU kernels' bits
#      (tools/h200/check_jax_gpu.sh, run alongside stage 2): default.log/json, ...;
#   4. the harness (bf16_harness): every op x rounding x dtype bit for bit, timed
#      against a device copy, launch configurations swept, and compared with the
#      first H200 run (docs/h200/harness.json): harness.txt, harness.json;
#   5. the PyTorch peers, same run (cc/harness/torch_peers.py): torch_peers.txt/json;
#   6. summary.txt: the verdict lines and tf_bf16 against the peers; on the GPU every
#      other file then goes into h200_run.tgz (the device tool returns at most 8 files).
# Time limits: 150 s for stages 2-3 together, then 290 s harness, 80 s peers:
# about 9 minutes in all, within the 10-minute call.
# LOCAL=1: a dry run on a machine without a GPU (JAX's CPU backend, the harness as plain
# C++ on kernels::HostEmulator at 2^14 elements, no peers).
set -u
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
LOCAL="${LOCAL:-0}"
BACKEND=gpu; HARNESS_MODE=gpu; HARNESS_SIZE=(--log2n 28 --big 1000000000)
if [ "$LOCAL" = 1 ]; then BACKEND=cpu; HARNESS_MODE=host; HARNESS_SIZE=(--log2n 14); fi
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/h200}"
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "=== $(date +%H:%M:%S) (+$(( $(date +%s) - T0 )) s) $*"; }

stamp env
{ nvidia-smi; nvcc --version; git log --oneline -1 2>/dev/null; nproc; free -g;
  python3 -c 'import torch; print("torch", torch.__version__)';
  python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'; } > "$OUT/env.txt" 2>&1
grep -E "H200|release|^torch|^jax" "$OUT/env.txt"

stamp "harness build (background)"
( bash cc/harness/build.sh /tmp/bf16_harness "$HARNESS_MODE" > "$OUT/build.log" 2>&1
  echo "exit $?" >> "$OUT/build.log" ) &
BUILD_PID=$!

# Wheels: Keras for the JAX check, torchao and optimi for the peers.
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/tf_bf16_site .whl/*.whl > "$OUT/pip.log" 2>&1 || stamp "pip install failed"
    export PYTHONPATH="/tmp/tf_bf16_site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Two JAX processes share the GPU while the checks run: no preallocation.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

stamp "XLA HLO on the GPU (background)"
( env -u XLA_FLAGS timeout 70 python3 tools/xla_hlo_run_jax.py out/xla_hlo --backend "$BACKEND" \
      > "$OUT/xla_hlo.txt" 2>&1; echo "exit $?" >> "$OUT/xla_hlo.txt"
  XLA_FLAGS=--xla_allow_excess_precision=false timeout 60 python3 tools/xla_hlo_run_jax.py \
      out/xla_hlo --backend "$BACKEND" > "$OUT/xla_hlo_no_excess_precision.txt" 2>&1
  echo "exit $?" >> "$OUT/xla_hlo_no_excess_precision.txt" ) &
XLA_PID=$!

stamp "JAX backend on the GPU (tools/h200/check_jax_gpu.sh)"
OUT="$OUT" PASS1_SECONDS=105 PASS2_SECONDS=15 timeout 150 bash tools/h200/check_jax_gpu.sh \
    > "$OUT/jax_check.txt" 2>&1
stamp "JAX check exit $?"
grep -E "SUMMARY|pass [12]|FAIL|ERROR" "$OUT/jax_check.txt" | tail -8
wait $XLA_PID
grep -iE "summary|differ|exit" "$OUT/xla_hlo.txt" "$OUT/xla_hlo_no_excess_precision.txt" | tail -8

stamp "waiting for the harness build"
wait $BUILD_PID
tail -2 "$OUT/build.log"
stamp harness
if [ -x /tmp/bf16_harness ]; then
    timeout 290 /tmp/bf16_harness "${HARNESS_SIZE[@]}" --reps 20 \
        --baseline docs/h200/harness.json --json "$OUT/harness.json" > "$OUT/harness.txt" 2>&1
    stamp "harness exit $?"
else
    stamp "no harness binary: see $OUT/build.log"
fi

stamp "torch peers"
[ "$LOCAL" = 1 ] || timeout 80 python3 cc/harness/torch_peers.py --log2n 28 --reps 20 \
    --json "$OUT/torch_peers.json" > "$OUT/torch_peers.txt" 2>&1
stamp "torch peers exit $?"

stamp summary
{
  grep -hE "bf16_harness: |torch_peers: [0-9]|SUMMARY" "$OUT/harness.txt" "$OUT/torch_peers.txt" \
      "$OUT/jax_check.txt" 2>/dev/null
  grep -hiE "^summary|tf_bf16 cases" "$OUT/xla_hlo.txt" "$OUT/xla_hlo_no_excess_precision.txt" 2>/dev/null
  python3 tools/h200/summary.py "$OUT/harness.json" "$OUT/torch_peers.json" docs/h200/harness.json
  sed -n '/^against /,$p' "$OUT/harness.txt" 2>/dev/null
} 2>&1 | tee "$OUT/summary.txt"
if [ "$LOCAL" != 1 ]; then
  # The device tool returns at most 8 files (the second run lost six): everything in
  # one archive, the summary beside it.
  tar czf /tmp/h200_run.tgz -C "$OUT" . \
    && find "$OUT" -mindepth 1 -maxdepth 1 ! -name summary.txt -exec rm -rf {} + \
    && mv /tmp/h200_run.tgz "$OUT/"
fi
stamp done
