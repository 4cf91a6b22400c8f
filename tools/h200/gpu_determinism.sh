#!/usr/bin/env bash
# Two measurements on the H200 that docs/bench_gpu.md and docs/results.md cite,
# in one call of the device tool (about 7 minutes):
#
#   run(kind="nvidia-h200", timeout_s=560, carry=[".whl"], command="bash tools/h200/gpu_determinism.sh")
#
# 1. tools/profile_update.py: the bf16 Adam update alone on 268M parameters with
#    the specification's pieces added one at a time (why it reaches 74-81% of a
#    device copy) -> $OUT/profile_update.txt, .json.
# 2. Is a GPU training run reproducible? The same float32 run of the accuracy
#    job (transformer_lm --config gpu, shortened to DET_STEPS steps) twice as
#    Keras runs it, then twice with XLA_FLAGS=--xla_gpu_deterministic_ops=true;
#    each run's final-state SHA-256 and held-out curve -> $OUT/determinism.txt.
# Progress with timestamps in $OUT/determinism.log.
set -u
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/h200_determinism}"
DET_STEPS="${DET_STEPS:-400}"
DET_ARGS="${DET_ARGS:---config gpu}"   # the tests pass --reduced on a CPU
UPDATE_ARGS="${UPDATE_ARGS:-}"      # and --parameters 4096 --calls 1 --repeats 1
RUNS=/tmp/tf_bf16_determinism
mkdir -p "$OUT" "$RUNS"
stamp() { date +%H:%M:%S; }
source tools/h200/keras_from_wheels.sh
LOG="$OUT/determinism.log"
echo "[$(stamp)] $(nvidia-smi -L 2>/dev/null | head -1)" | tee "$LOG"

echo "[$(stamp)] python3 tools/profile_update.py" | tee -a "$LOG"
# shellcheck disable=SC2086
timeout 200 python3 tools/profile_update.py $UPDATE_ARGS --json "$OUT/profile_update.json" \
  2>> "$LOG" | tee "$OUT/profile_update.txt"

for run in plain1 plain2 deterministic1 deterministic2; do
  flags=""
  case $run in deterministic*) flags="--xla_gpu_deterministic_ops=true" ;; esac
  echo "[$(stamp)] $run: XLA_FLAGS=$flags compare --variants float32 --steps $DET_STEPS" \
    | tee -a "$LOG"
  # shellcheck disable=SC2086
  XLA_FLAGS="$flags" timeout 150 python3 -m tf_bf16 compare --backend jax \
    --task transformer_lm $DET_ARGS --steps "$DET_STEPS" --variants float32 \
    --no-progress --out "$RUNS/$run" > "$RUNS/$run.txt" 2>> "$LOG" \
    || echo "[$(stamp)] $run failed (status $?)" | tee -a "$LOG"
done

python3 - "$RUNS" "$DET_ARGS --steps $DET_STEPS" > "$OUT/determinism.txt" <<'EOF'
import json, os, sys
runs = sys.argv[1]
print(f"float32 transformer_lm {sys.argv[2]}, the same command run twice, without and "
      "with XLA_FLAGS=--xla_gpu_deterministic_ops=true")
for run in ("plain1", "plain2", "deterministic1", "deterministic2"):
    path = os.path.join(runs, run, "results.json")
    if not os.path.exists(path):
        print(f"{run:<15} no result")
        continue
    result = json.load(open(path))["variants"]["float32"]
    curve = " ".join(f"{x:.4f}" for x in result["curve"])
    print(f"{run:<15} initial {result['initial_weights_sha256'][:16]} final "
          f"{result['state_sha256'][:16]} {result.get('ms_per_step') or float('nan'):.1f} ms/step  curve {curve}")
EOF
cat "$OUT/determinism.txt"
