#!/usr/bin/env bash
# Prepares, on a machine with TensorFlow (this one), everything tools/h200/run_all.sh
# needs on the H200, which has no TensorFlow:
#   out/xla_hlo                the HLO of jit-compiled tf_bf16 train steps, their inputs and
#                              the CPU kernels' results (tools/xla_hlo_export.py);
#   out/jax_parity_reference   the TensorFlow CPU kernels' bits for tools/jax_parity.py's cases;
#   .whl/                      wheels for the H200's Python 3.12: Keras 3.15.1, namex, optree
#                              (the JAX check) and torchao, torch-optimi (the PyTorch peers).
# Both references are bits of the current code: rebuild them whenever the rounding
# specification changes (docs/rounding.md), or the GPU checks compare against stale bits.
# Prints what to carry and its size. About 3 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
export TF_CPP_MIN_LOG_LEVEL=3
stamp() { echo "=== $(date +%H:%M:%S) $*"; }

stamp "library: $(python3 -c 'import tf_bf16, os; print(os.path.dirname(tf_bf16.__file__))' 2>/dev/null)"
rm -rf out/xla_hlo out/jax_parity_reference
stamp "XLA HLO export (tools/xla_hlo_export.py)"
python3 tools/xla_hlo_export.py --out out/xla_hlo 2>&1 | grep -v "^WARNING: All log\|^I0000" | tail -15
stamp "JAX parity reference (tools/jax_parity.py reference)"
KERAS_BACKEND=tensorflow python3 tools/jax_parity.py reference out/jax_parity_reference 2>&1 \
    | grep -v "^WARNING: All log\|^I0000" | tail -5
stamp "wheels for Python 3.12 (.whl)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl keras==3.15.1 namex optree
bash cc/harness/fetch_wheels.sh > /dev/null
stamp "carry (64 MiB at most in all):"
du -sh .whl out/xla_hlo out/jax_parity_reference
du -sc .whl out/xla_hlo out/jax_parity_reference | tail -1
echo 'carry=[".whl", "out/xla_hlo", "out/jax_parity_reference"]'
echo 'command="bash tools/h200/run_all.sh"'
