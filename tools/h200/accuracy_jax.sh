#!/usr/bin/env bash
# The GPU-scale accuracy run on the H200 (JAX with CUDA, no TensorFlow): the char
# Transformer LM at 101M parameters (compare --config gpu: 2,000 steps of batch
# 16 x 512 characters, Adam 6e-4, warmup + cosine to 0), float32,
# mixed_bfloat16, bf16 nearest, SR and Kahan, one process per variant. One call:
#
#   run(kind="nvidia-h200", timeout_s=600, carry=[".whl"], command="bash tools/h200/accuracy_jax.sh")
#
# Writes $OUT/accuracy/results.json, results.md, curves.png, and
# $OUT/accuracy.txt (the table), $OUT/accuracy.log (timestamped progress), env.txt.
# Time: ACC_SECONDS (default 500) for compare's --max-minutes, an outer timeout
# 45 s later, plus installing Keras's wheels: under 9.5 minutes. If the run does
# not finish in time it saves the running variant's state in $WORK
# (/tmp/tf_bf16_accuracy, outside $OUT) and exits with status 3; calling this
# script again on the same machine (while it is still warm) continues from
# there, bit-identically, and the outputs then hold every variant. A variant that
# fails is reported and the others go on. ACC_ARGS replaces the configuration
# (default "--config gpu"; the tests pass "--reduced --steps 8" on a CPU).
# XLA_FLAGS passes through (recorded in env.txt and the results' machine line):
# XLA_FLAGS=--xla_gpu_deterministic_ops=true makes a rerun repeat the bits,
# which XLA:GPU's defaults do not (tools/h200/gpu_determinism.sh measured both).
set -u
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/h200_accuracy}"
WORK="${WORK:-/tmp/tf_bf16_accuracy}"
ACC_SECONDS="${ACC_SECONDS:-500}"
mkdir -p "$OUT"
stamp() { date +%H:%M:%S; }

source tools/h200/keras_from_wheels.sh
{
  echo "[$(stamp)] $(python3 --version 2>&1); $(nvidia-smi -L 2>/dev/null | head -1)"
  git log -1 --format='commit %H %s' 2>/dev/null
  echo "XLA_FLAGS=${XLA_FLAGS:-}; corpus: $(python3 -c 'import os, glob; d = os.path.dirname(os.__file__); print(d, len(glob.glob(d + "/*.py")), "files")')"
} 2>&1 | tee "$OUT/env.txt"

MINUTES=$(python3 -c "print(round($ACC_SECONDS / 60, 2))")
if [ -f "$WORK/command.json" ]; then
  echo "[$(stamp)] resuming the run saved in $WORK"
  set -- compare --resume "$WORK"
else
  # shellcheck disable=SC2086
  set -- compare --backend jax --task transformer_lm ${ACC_ARGS:---config gpu} --work-dir "$WORK"
fi
echo "[$(stamp)] python -m tf_bf16 $* --max-minutes $MINUTES"
timeout $((ACC_SECONDS + 45)) python3 -m tf_bf16 "$@" --max-minutes "$MINUTES" \
  --out "$OUT/accuracy" 2> >(grep --line-buffered -v "^WARNING: All log\|^I0000\|^E0000" \
  | tee "$OUT/accuracy.log" >&2) | tee "$OUT/accuracy.txt"
STATUS=${PIPESTATUS[0]}
sleep 1
case $STATUS in
  0) echo "[$(stamp)] done; results in $OUT/accuracy" ;;
  3) echo "[$(stamp)] PAUSED with the state in $WORK: call this script again on this machine to continue" ;;
  *) echo "[$(stamp)] compare exit status $STATUS (1: a variant failed; 124: outer timeout); results in $OUT" ;;
esac
