#!/usr/bin/env bash
# Build test of the GPU op library on a machine without a GPU or a CUDA
# install (make test runs it; so does tests/test_gpu_build.py, marked slow):
#   1. installs nvcc with pip if none is found (nvidia-cuda-nvcc,
#      nvidia-cuda-runtime, nvidia-cuda-cccl and nvidia-cuda-cuobjdump: CUDA
#      13.x, nvcc at site-packages/nvidia/cu13/bin/nvcc);
#   2. copies the tracked sources to a temporary directory and builds both op
#      libraries there with `TF_BF16_GPU=1 setup.py build_ext` against the
#      installed TensorFlow (tensorflow-cpu lacks TensorFlow's CUDA headers:
#      setup.py links a shim directory to the CUDA headers beside nvcc), for
#      TF_BF16_CUDA_ARCHS (default 80,90);
#   3. checks that the GPU library has no undefined CUDA symbols (cudart is
#      linked statically) and carries machine code for every architecture
#      (cuobjdump), with the kernels of every op;
#   4. loads it into this TensorFlow (which has no GPU support: the library's
#      CUDA code never runs here, but its CPU kernels do) and checks, from
#      TensorFlow's kernel registry, that every op has a GPU kernel for every
#      dtype combination, with every input but the tensors (x, delta, grad,
#      indices) in host memory, and that its CPU kernels give the CPU
#      library's bits.
# Prints "gpu_build_check: OK ..." or "gpu_build_check: FAILED ..." last and
# exits non-zero on failure. Nothing here runs a CUDA kernel: no GPU.
#
# Environment: PYTHON (default python3), NVCC, TF_BF16_CUDA_ARCHS,
# TF_BF16_GPU_BUILD_DIR (default: a new temporary directory, removed after),
# TF_BF16_GPU_REUSE=1 (check the build already in TF_BF16_GPU_BUILD_DIR).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON="${PYTHON:-python3}"
T0=$(date +%s)

fail() {
    echo "gpu_build_check: FAILED: $*"
    exit 1
}

# --- 1. nvcc ------------------------------------------------------------------
SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    || fail "no Python '$PYTHON'"
find_nvcc() {
    for c in "${NVCC:-}" "$(command -v nvcc 2>/dev/null)" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" \
             /usr/local/cuda/bin/nvcc "$SITE"/nvidia/cu*/bin/nvcc; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}
NVCC_FOUND=$(find_nvcc)
CUOBJDUMP=$(ls "$SITE"/nvidia/cu*/bin/cuobjdump 2>/dev/null | head -1)
if [ -z "$NVCC_FOUND" ] || { [ -z "$CUOBJDUMP" ] && ! command -v cuobjdump >/dev/null; }; then
    echo "gpu_build_check: installing nvcc with pip (nvidia-cuda-nvcc, -runtime, -cccl, -cuobjdump)"
    "$PYTHON" -m pip install -q nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl \
        nvidia-cuda-cuobjdump > /tmp/tf_bf16_gpu_build_pip.log 2>&1 \
        || { tail -20 /tmp/tf_bf16_gpu_build_pip.log; fail "pip install of the CUDA compiler"; }
    NVCC_FOUND=$(find_nvcc) || fail "pip installed no nvcc under $SITE/nvidia"
    CUOBJDUMP=$(ls "$SITE"/nvidia/cu*/bin/cuobjdump 2>/dev/null | head -1)
fi
[ -n "$CUOBJDUMP" ] || CUOBJDUMP=$(command -v cuobjdump)
export NVCC="$NVCC_FOUND"
echo "gpu_build_check: $("$NVCC" --version | tail -1) at $NVCC"

# --- 2. build -----------------------------------------------------------------
if [ -n "${TF_BF16_GPU_BUILD_DIR:-}" ]; then
    WORK="$TF_BF16_GPU_BUILD_DIR"
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d /tmp/tf_bf16_gpu_build.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi
SRC="$WORK/src"
if [ -n "${TF_BF16_GPU_REUSE:-}" ] && ls "$SRC"/tf_bf16/_tf_bf16_gpu_ops*.so > /dev/null 2>&1; then
    echo "gpu_build_check: reusing the build in $SRC (TF_BF16_GPU_REUSE)"
else
    rm -rf "$SRC"
    mkdir -p "$SRC"
    git ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$SRC") || fail "copying the sources"
    LOG="$WORK/build.log"
    T1=$(date +%s)
    if ! (cd "$SRC" && TF_BF16_GPU=1 "$PYTHON" setup.py build_ext --inplace > "$LOG" 2>&1); then
        grep -v '^\s*$' "$LOG" | tail -40
        fail "TF_BF16_GPU=1 setup.py build_ext (log: $LOG)"
    fi
    grep '^tf_bf16:' "$LOG"
    echo "gpu_build_check: built in $(( $(date +%s) - T1 )) s"
fi
GPU_SO=$(ls "$SRC"/tf_bf16/_tf_bf16_gpu_ops*.so 2>/dev/null | head -1)
CPU_SO=$(ls "$SRC"/tf_bf16/_tf_bf16_ops*.so 2>/dev/null | head -1)
[ -f "$GPU_SO" ] || fail "the build made no tf_bf16/_tf_bf16_gpu_ops*.so"
[ -f "$CPU_SO" ] || fail "the build made no tf_bf16/_tf_bf16_ops*.so"
echo "gpu_build_check: $(basename "$GPU_SO"), $(du -h "$GPU_SO" | cut -f1)"

# --- 3. the library's symbols and machine code --------------------------------
UNDEFINED_CUDA=$(nm -D --undefined-only "$GPU_SO" | grep -E ' (cuda|__cuda)' || true)
[ -z "$UNDEFINED_CUDA" ] || fail "undefined CUDA symbols (cudart should be static): $UNDEFINED_CUDA"
ARCHS=$("$PYTHON" -c 'import json; print(" ".join(str(a) for a in json.load(open("'"$SRC"'/tf_bf16/_build_info.json"))["gpu"]["cuda_archs"]))')
ELF_LIST=$("$CUOBJDUMP" --list-elf "$GPU_SO") || fail "cuobjdump --list-elf"
for arch in $ARCHS; do
    grep -q "sm_$arch" <<< "$ELF_LIST" || fail "no sm_$arch machine code in $(basename "$GPU_SO")"
done
ELF_SYMBOLS=$("$CUOBJDUMP" --dump-elf-symbols "$GPU_SO" 2>/dev/null) || fail "cuobjdump --dump-elf-symbols"
KERNELS=$(grep -c '^FUNC .*Kernel' <<< "$ELF_SYMBOLS" || true)
KERNELS_PER_ARCH=$(( KERNELS / $(echo $ARCHS | wc -w) ))
for kernel in DenseKernel SparseKernel ValidateIndicesKernel MarkGroupStartsKernel FinishGroupsKernel; do
    grep -q "$kernel" <<< "$ELF_SYMBOLS" || fail "no $kernel in the machine code"
done
echo "gpu_build_check: machine code for sm_${ARCHS// /, sm_}; about $KERNELS_PER_ARCH kernels each"

# --- 4. TensorFlow's view of it -------------------------------------------------
TF_CPP_MIN_LOG_LEVEL=3 TF_BF16_OPS_LIBRARY="$GPU_SO" CPU_SO="$CPU_SO" PYTHONPATH="$SRC" \
"$PYTHON" - <<'EOF' || fail "the registration check (above)"
import os, subprocess, sys
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import kernels, op_def_registry
import tf_bf16
from tf_bf16 import ops

assert tf_bf16._loader.library_path() == os.environ["TF_BF16_OPS_LIBRARY"]
tf_bf16._loader.load()
DEVICE_TENSORS = {"x", "delta", "grad", "indices"}
TYPES = {tf.float32.as_datatype_enum, tf.bfloat16.as_datatype_enum}
INDEX_TYPES = {tf.int32.as_datatype_enum, tf.int64.as_datatype_enum}
problems, counted = [], 0
names = ["TfBf16>StochasticRound", "TfBf16>ResourceRoundedAssignAdd", "TfBf16>ResourceApplySgd",
         "TfBf16>ResourceApplyAdam", "TfBf16>ResourceApplyLion",
         "TfBf16>ResourceSparseApplySgd", "TfBf16>ResourceSparseApplyAdam"]
for name in names:
    op_def = op_def_registry.get(name)
    inputs = {a.name for a in op_def.input_arg}
    registered = kernels.get_registered_kernels_for_op(name).kernel
    gpu = [k for k in registered if k.device_type == "GPU"]
    cpu = [k for k in registered if k.device_type == "CPU"]
    combos = set()
    for k in gpu:
        counted += 1
        host = set(k.host_memory_arg)
        if host != inputs - DEVICE_TENSORS:
            problems.append(f"{name}: GPU host memory {sorted(host)}, expected "
                            f"{sorted(inputs - DEVICE_TENSORS)}")
        combos.add(tuple(sorted((c.name, tuple(c.allowed_values.list.type)) for c in k.constraint)))
    expected = 1 if name.endswith("StochasticRound") else 4 * (2 if "Sparse" in name else 1)
    if len(gpu) != expected or len(combos) != expected or len(cpu) != expected:
        problems.append(f"{name}: {len(gpu)} GPU kernels ({len(combos)} distinct), "
                        f"{len(cpu)} CPU kernels; expected {expected} of each")
# The GPU library's CPU kernels: the CPU library's bits (compared in another
# process, since both libraries register the same ops).
code = """
import numpy as np, tensorflow as tf, sys
from tf_bf16 import ops
rng = np.random.default_rng(0)
w = tf.Variable(tf.cast(rng.standard_normal(1003), tf.bfloat16))
m, v = tf.Variable(tf.zeros_like(w)), tf.Variable(tf.zeros_like(w))
for step in range(3):
    ops.apply_adam(w, tf.constant(rng.standard_normal(1003), tf.float32), m, v, 1e-3,
                   step=step, rounding="stochastic", seed=7)
g = tf.IndexedSlices(tf.ones([4, 59]), tf.constant([5, 1, 5, 0]))
e = tf.Variable(tf.ones([17, 59], tf.bfloat16)); a = tf.Variable(tf.zeros_like(e))
ops.apply_sgd(e, g, 0.1, momentum=0.9, accumulator=a, rounding="kahan",
              compensation=tf.Variable(tf.zeros_like(e)))
sys.stdout.write(np.concatenate([tf.bitcast(t, tf.uint16).numpy().ravel()
                                 for t in (w, m, v, e, a)]).tobytes().hex())
"""
outputs = []
for library in (os.environ["TF_BF16_OPS_LIBRARY"], os.environ["CPU_SO"]):
    env = dict(os.environ, TF_BF16_OPS_LIBRARY=library)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if run.returncode:
        problems.append(f"running ops from {os.path.basename(library)}: {run.stderr[-1500:]}")
    outputs.append(run.stdout)
if outputs[0] != outputs[1] or not outputs[0]:
    problems.append("the GPU library's CPU kernels differ from the CPU library's")
for p in problems:
    print("  " + p)
print(f"gpu_build_check: {counted} GPU kernel registrations checked; the GPU library's CPU "
      f"kernels match the CPU library bit for bit")
sys.exit(1 if problems else 0)
EOF

echo "gpu_build_check: OK ($(basename "$GPU_SO"), $("$NVCC" --version | tail -1 | sed 's/^Build //'), $(( $(date +%s) - T0 )) s; the CUDA kernels were compiled, not run: no GPU here)"
