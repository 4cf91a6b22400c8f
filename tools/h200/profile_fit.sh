#!/usr/bin/env bash
# Where a pure-bf16 fit step spends its time on the H200 (docs/bench_gpu.md: at 101M
# parameters tf_bf16's step took 3.1x mixed precision's). One device call, under 9 minutes:
#
#   run(kind="nvidia-h200", timeout_s=560, carry=[".whl"], command="bash tools/h200/profile_fit.sh")
#
# tools/profile_fit_step.py --trace for mixed_bfloat16, stock (pure bf16, stock Keras Adam),
# nearest, stochastic and kahan at 101M parameters, one process each: the jitted step, the
# step without the update, the update alone, model.fit's step, the top kernels of a step
# (JAX's profiler: nsys is not on the H200 machines), the optimized HLO and XLA's dump.
# Writes $OUT/profile.txt (the tables) and $OUT/profile.tgz (JSON, HLO, the dump's
# optimized train-step modules): the device tool returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/h200_profile}"
WORK=/tmp/tf_bf16_profile
mkdir -p "$OUT" "$WORK"
source tools/h200/keras_from_wheels.sh
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
  timeout "${PROFILE_TIMEOUT:-480}" python3 tools/profile_fit_step.py --trace --out "$WORK" \
      --xla-dump "$WORK/xla_dump" --variants "${VARIANTS:-mixed_bfloat16,nearest,stock,stochastic,kahan}" \
      ${PROFILE_ARGS:-}
  echo "exit $?"
} 2>&1 | grep -v "^WARNING: All log\|^I0000" | tee "$OUT/profile.txt"
# The dump's optimized train steps only (the rest is large and not read).
(cd "$WORK" && find . -name '*.json' -o -name 'hlo_*.txt' \
    -o -path './xla_dump/*' -name '*train_step*after_optimizations.txt') \
  | tar czf "$OUT/profile.tgz" -C "$WORK" -T - 2>/dev/null
ls -la "$OUT"
