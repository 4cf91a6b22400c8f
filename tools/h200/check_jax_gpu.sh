#!/usr/bin/env bash
# tf_bf16's JAX path on a GPU against TensorFlow CPU kernel bits computed elsewhere.
#
# Runs in the repository root of the device machine (JAX with CUDA, no TensorFlow),
# with the reference folder written here by
#   KERAS_BACKEND=tensorflow python3 tools/jax_parity.py reference out/jax_parity_reference
# and Keras's wheels in .whl/ (see tools/h200/README.md). Writes logs and JSON
# results to $OUT (or out/h200 if $OUT is unset). Keeps going past failures:
#   pass 1: every case, XLA's default flags (the claim under test);
#   a diagnostic: how many kernels (fusions) XLA makes of each update;
#   pass 2: with --xla_allow_excess_precision=false, the cases pass 1 found
#           different (a diagnostic; all cases if pass 1 passed), as time allows.
# Also runs on a CPU machine with JAX (then the wheels are not needed).
set -u
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/h200}"
REFERENCE="${REFERENCE:-out/jax_parity_reference}"
mkdir -p "$OUT"
stamp() { date +%H:%M:%S; }

source tools/h200/keras_from_wheels.sh
echo "[$(stamp)] $(python3 --version 2>&1); $(nvidia-smi -L 2>/dev/null | head -1)"
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" \
  || echo "[$(stamp)] jax/keras import failed"

echo "[$(stamp)] pass 1: XLA default flags"
env -u XLA_FLAGS timeout "${PASS1_SECONDS:-125}" python3 tools/jax_parity.py check "$REFERENCE" \
  --json "$OUT/default.json" 2>&1 | grep -v "^WARNING: All log\|^I0000" | tee "$OUT/default.log"
echo "[$(stamp)] pass 1 exit status ${PIPESTATUS[0]}"

echo "[$(stamp)] diagnostic: kernels XLA makes of one update (for the benchmark to come)"
timeout 15 python3 tools/jax_parity.py fusions 2>&1 | grep "kernels" | tee "$OUT/fusions.log"

CASES=$(python3 - "$OUT/default.json" <<'PY' 2>/dev/null
import json, sys
results = json.load(open(sys.argv[1]))["results"]
print(" ".join(f"--case={r['name']}" for r in results if r["verdict"] != "PASS"))
PY
)
echo "[$(stamp)] pass 2: XLA_FLAGS=--xla_allow_excess_precision=false ${CASES:-(all cases)}"
XLA_FLAGS=--xla_allow_excess_precision=false timeout "${PASS2_SECONDS:-20}" python3 \
  tools/jax_parity.py check "$REFERENCE" --json "$OUT/no_excess_precision.json" $CASES 2>&1 \
  | grep -v "^WARNING: All log\|^I0000" | tee "$OUT/no_excess_precision.log" | grep -v " PASS "
echo "[$(stamp)] pass 2 exit status ${PIPESTATUS[0]}; results in $OUT"
