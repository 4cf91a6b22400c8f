#!/usr/bin/env bash
# Where a pure-bf16 fit step spends its time on the H200 (docs/bench_gpu.md: at 101M
# parameters tf_bf16's step took 3.1x mixed precision's). One device call, under 6 minutes:
#
#   run(kind="nvidia-h200", timeout_s=420, carry=[".whl"], command="bash tools/h200/profile_fit.sh")
#
# tools/profile_fit_step.py for mixed_bfloat16, nearest, stochastic and kahan at 101M
# parameters: fit step, the same step without the update, the optimized HLO's kernel
# counts; each variant under `nsys profile --stats=true` when nsys is installed (its
# kernel summary per process). Writes everything to $OUT as one archive (the device tool
# returns at most 8 files): profile.tgz, plus profile.txt (the table and nsys's top kernels).
set -u
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/h200_profile}"
WORK=/tmp/tf_bf16_profile
mkdir -p "$OUT" "$WORK"
if ! python3 -c "import keras" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tf_bf16_site .whl/*.whl \
    || echo "pip install failed"
  export PYTHONPATH="/tmp/tf_bf16_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  timeout 200 python3 tools/profile_fit_step.py --out "$WORK" --xla-dump "$WORK/xla_dump" \
      ${PROFILE_ARGS:-}
  echo "exit $?"
  if command -v nsys > /dev/null; then
    for variant in mixed_bfloat16 nearest; do
      echo "== nsys: $variant"
      timeout 90 nsys profile -t cuda --stats=false -o "$WORK/nsys_$variant" -f true \
          python3 tools/profile_fit_step.py --one "$variant" --out "$WORK" --steps 5 --rounds 2 \
          ${PROFILE_ARGS:-} > /dev/null 2>&1
      nsys stats -r cuda_gpu_kern_sum -f csv "$WORK/nsys_$variant.nsys-rep" 2>/dev/null | head -25
    done
  else
    echo "nsys not installed: no kernel table"
  fi
} 2>&1 | grep -v "^WARNING: All log\|^I0000" | tee "$OUT/profile.txt"
tar czf "$OUT/profile.tgz" -C "$WORK" --exclude='*.sqlite' . 2>/dev/null
ls -la "$OUT"
