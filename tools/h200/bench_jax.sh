#!/usr/bin/env bash
# bench-gpu on the H200 (JAX with CUDA, no TensorFlow): the update alone vs a
# device copy, the fit step at 404M parameters, the largest model that trains;
# pure bf16 (nearest, SR, Kahan) against mixed_bfloat16 and float32, one process
# per measurement. One call of the device tool:
#
#   run(kind="nvidia-h200", timeout_s=600, carry=[".whl"], command="bash tools/h200/bench_jax.sh")
#
# Everything lands in $OUT (default out/h200_bench): bench_gpu.txt (tables and
# verdict), bench_gpu.log (timestamped progress), bench_gpu.json, bench_gpu.md,
# env.txt. Time: BENCH_SECONDS (default 500) for the benchmark's own
# --max-minutes, an outer timeout 30 s later, plus installing Keras's wheels and
# the environment check: about 9 minutes in all. Keeps going past a failing
# measurement (its targets are SKIPPED). BENCH_ARGS adds options (e.g. --tiny
# --memory-limit 0.006 on a CPU: the tests run it so, with TensorFlow blocked).
set -u
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/h200_bench}"
BENCH_SECONDS="${BENCH_SECONDS:-500}"
mkdir -p "$OUT"
stamp() { date +%H:%M:%S; }

source tools/h200/keras_from_wheels.sh
{
  echo "[$(stamp)] $(python3 --version 2>&1); $(nvidia-smi -L 2>/dev/null | head -1)"
  git log -1 --format='commit %H %s' 2>/dev/null
  python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" \
    || echo "[$(stamp)] jax/keras import failed"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
} 2>&1 | tee "$OUT/env.txt"

MINUTES=$(python3 -c "print(round($BENCH_SECONDS / 60, 2))")
echo "[$(stamp)] bench-gpu --backend jax --max-minutes $MINUTES ${BENCH_ARGS:-}"
# shellcheck disable=SC2086
timeout $((BENCH_SECONDS + 30)) python3 -m tf_bf16 bench-gpu --backend jax \
  --max-minutes "$MINUTES" --json "$OUT/bench_gpu.json" --markdown "$OUT/bench_gpu.md" \
  ${BENCH_ARGS:-} 2> >(grep --line-buffered -v "^WARNING: All log\|^I0000\|^E0000" \
  | tee "$OUT/bench_gpu.log" >&2) | tee "$OUT/bench_gpu.txt"
STATUS=${PIPESTATUS[0]}
sleep 1
echo "[$(stamp)] bench-gpu exit status $STATUS (124: stopped by the outer timeout); results in $OUT"
