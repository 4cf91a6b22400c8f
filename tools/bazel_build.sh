#!/usr/bin/env bash
# Builds the op library with Bazel (//:tf_bf16_ops, see BUILD) and proves that
# it is the library setup.py builds:
#   1. installs Bazel if it is missing (Debian's bazel-bootstrap, Bazel 4.2.3);
#   2. `bazel build //:tf_bf16_ops`, offline, against the TensorFlow that
#      ${PYTHON_BIN_PATH:-${PYTHON:-python3}} imports;
#   3. loads bazel-bin/_tf_bf16_ops.so with tf.load_op_library, runs
#      tf_bf16_stochastic_round on a small tensor and checks the result, and
#      runs it under jit_compile=True (the XLA lowering) for the same bits;
#   4. checks the compile lines Bazel ran (bazel aquery): -ffp-contract=off,
#      and, if setup.py recorded its flags (tf_bf16/_build_info.json), the same
#      flags as setup.py's (warning options -W... may differ, with a note);
#   5. if setup.py's tf_bf16/_tf_bf16_ops*.so exists, runs the same op from it
#      (in another process: both libraries register the same op names) and
#      requires the same op definitions and bit-identical output.
# Prints one line "bazel_build: OK ..." or "bazel_build: FAILED ..." at the
# end and exits non-zero on failure.
#
# Environment:
#   PYTHON_BIN_PATH   Python with TensorFlow (default: $PYTHON, else python3)
#   BAZEL             Bazel binary (default: bazel on PATH, installed if absent)
#   TF_BF16_BAZEL_OUTPUT_USER_ROOT
#                     Bazel's --output_user_root (default /tmp/tf_bf16_bazel-$UID;
#                     Bazel keeps one output base per workspace path under it)
#   TF_BF16_BAZEL_KEEP_SERVER=1
#                     leave the Bazel server running (default: shut it down, its
#                     JVM holds ~0.5 GB)
#   TF_BF16_PORTABLE  as for setup.py: no -mavx2
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)

fail() {
    echo "bazel_build: FAILED: $*"
    exit 1
}

export PYTHON_BIN_PATH="${PYTHON_BIN_PATH:-${PYTHON:-python3}}"
command -v "$PYTHON_BIN_PATH" >/dev/null 2>&1 || fail "no Python '$PYTHON_BIN_PATH' (set PYTHON_BIN_PATH)"

# --- 1. Bazel ---------------------------------------------------------------
BAZEL="${BAZEL:-bazel}"
if ! command -v "$BAZEL" >/dev/null 2>&1; then
    echo "bazel_build: '$BAZEL' not found; installing Debian's bazel-bootstrap"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    { $SUDO apt-get update -q && $SUDO apt-get install -y -q bazel-bootstrap; } \
        > /tmp/tf_bf16_bazel_install.log 2>&1 \
        || { tail -20 /tmp/tf_bf16_bazel_install.log; fail "apt-get install bazel-bootstrap (log: /tmp/tf_bf16_bazel_install.log)"; }
    BAZEL=bazel
    command -v "$BAZEL" >/dev/null 2>&1 || fail "bazel-bootstrap installed no 'bazel'"
    echo "bazel_build: installed Bazel in $(( $(date +%s) - T0 )) s"
fi

OUTPUT_USER_ROOT="${TF_BF16_BAZEL_OUTPUT_USER_ROOT:-/tmp/tf_bf16_bazel-$(id -u)}"
mkdir -p "$OUTPUT_USER_ROOT" || fail "cannot create $OUTPUT_USER_ROOT"
bazel_cmd() {
    "$BAZEL" --output_user_root="$OUTPUT_USER_ROOT" "$@"
}
if [ -z "${TF_BF16_BAZEL_KEEP_SERVER:-}" ]; then
    trap 'bazel_cmd shutdown >/dev/null 2>&1 || true' EXIT
fi

# --- 2. build ---------------------------------------------------------------
# Named like Bazel's output base for this workspace (the MD5 of its path).
LOG="$OUTPUT_USER_ROOT/bazel_build.$(printf %s "$ROOT" | md5sum | cut -c1-32).log"
echo "bazel_build: bazel build //:tf_bf16_ops (PYTHON_BIN_PATH=$PYTHON_BIN_PATH, log: $LOG)"
T1=$(date +%s)
if ! bazel_cmd build --color=no --curses=no --show_progress_rate_limit=60 //:tf_bf16_ops > "$LOG" 2>&1; then
    grep -v '^Loading' "$LOG" | tail -60
    fail "bazel build //:tf_bf16_ops (full log: $LOG)"
fi
BUILD_S=$(( $(date +%s) - T1 ))
grep -E '^(INFO: (Elapsed|[0-9]+ processes)|Target )' "$LOG" | sed 's/^/  /'
BAZEL_BIN=$(bazel_cmd info bazel-bin 2>/dev/null) || fail "bazel info bazel-bin"
BAZEL_SO="$BAZEL_BIN/_tf_bf16_ops.so"
[ -f "$BAZEL_SO" ] || fail "the build produced no $BAZEL_SO"
SHOWN_SO="$BAZEL_SO"
[ "$ROOT/bazel-bin/_tf_bf16_ops.so" -ef "$BAZEL_SO" ] && SHOWN_SO="bazel-bin/_tf_bf16_ops.so"
echo "bazel_build: built $SHOWN_SO in ${BUILD_S} s"

# --- 3.-5. load, run, check flags, compare --------------------------------------------------
EXT_SUFFIX=$("$PYTHON_BIN_PATH" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX") or ".so")')
SETUP_SO="$ROOT/tf_bf16/_tf_bf16_ops$EXT_SUFFIX"
if [ ! -f "$SETUP_SO" ]; then
    SETUP_SO=$(ls "$ROOT"/tf_bf16/_tf_bf16_ops*.so 2>/dev/null | head -1)
fi

TMP=$(mktemp -d /tmp/tf_bf16_bazel_check.XXXXXX) || fail "mktemp"
trap 'rm -rf "$TMP"; [ -n "${TF_BF16_BAZEL_KEEP_SERVER:-}" ] || bazel_cmd shutdown >/dev/null 2>&1 || true' EXIT

cat > "$TMP/check.py" <<'PYEOF'
"""probe LIB OUT: load LIB, run the op, save OUT.npy/.json. compare A B: diff two probes.
flags AQUERY_JSON TF_INCLUDE [BUILD_INFO_JSON]: check Bazel's compile lines."""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def test_input():
    import numpy as np
    rng = np.random.default_rng(20261128)
    # Magnitudes over most of the float32 range, both signs, plus edge cases:
    # zeros, exact bf16 values, ties, denormals, the largest floats, inf, NaN.
    x = rng.standard_normal(256 * 257).astype(np.float32)
    x *= np.float32(2.0) ** rng.integers(-60, 60, x.size).astype(np.float32)
    special = np.array([0.0, -0.0, 1.0, -1.0, 1.0 + 2.0 ** -8, -(1.0 + 2.0 ** -8), 3.0, 1e-40,
                        -1e-40, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 3.39e38,
                        np.inf, -np.inf, np.nan], dtype=np.float32)
    x[:special.size] = special
    return x.reshape(256, 257)


def probe(lib, out):
    import numpy as np
    import tensorflow as tf
    module = tf.load_op_library(lib)
    if not hasattr(module, "tf_bf16_stochastic_round"):
        sys.exit("%s has no tf_bf16_stochastic_round; it has %s" % (
            lib, sorted(n for n in dir(module) if n.startswith("tf_bf16_"))))
    x = test_input()
    args = dict(x=tf.constant(x), seed=tf.constant(1234, tf.int64),
                step=tf.constant(7, tf.int64), var_id=tf.constant(3, tf.int64))
    y = module.tf_bf16_stochastic_round(**args)
    if y.dtype != tf.bfloat16 or tuple(y.shape) != x.shape:
        sys.exit("tf_bf16_stochastic_round returned %s %s for float32 %s" % (
            y.dtype.name, tuple(y.shape), x.shape))
    bits = tf.bitcast(y, tf.uint16).numpy()
    again = tf.bitcast(module.tf_bf16_stochastic_round(**args), tf.uint16).numpy()
    if not np.array_equal(bits, again):
        sys.exit("tf_bf16_stochastic_round is not deterministic")
    # The XLA lowering of the same op (jit_compile=True) gives the same bits.
    xla = tf.function(module.tf_bf16_stochastic_round, jit_compile=True)(**args)
    if not np.array_equal(bits, tf.bitcast(xla, tf.uint16).numpy()):
        sys.exit("tf_bf16_stochastic_round under jit_compile=True differs from the CPU kernel")
    # A stochastic rounding of x: x itself where x is a bf16 value, else one
    # of the two bf16 neighbours of x (NaN stays NaN).
    u = x.view(np.uint32)
    lo = (u >> 16).astype(np.uint16)
    tiny = np.finfo(np.float32).tiny  # denormals are left out of the check
    finite = (np.isfinite(x) & (np.abs(x) < np.float32(3.38e38))
              & ((np.abs(x) >= tiny) | (x == 0)))
    exact = finite & ((u & 0xFFFF) == 0)
    inexact = finite & ~exact
    up = bits == lo + np.uint16(1)
    bad = (finite & (bits != lo) & ~up) | (exact & (bits != lo))
    if bad.any():
        i = np.flatnonzero(bad.ravel())[0]
        sys.exit("element %d: x=%r (0x%08x) gave bf16 0x%04x" % (
            i, float(x.ravel()[i]), int(u.ravel()[i]), int(bits.ravel()[i])))
    nan_in = np.isnan(x)
    y_f = tf.cast(y, tf.float32).numpy()
    if not np.isnan(y_f[nan_in]).all():
        sys.exit("NaN input did not stay NaN")
    up_fraction = float(up[inexact].mean())
    if not 0.3 < up_fraction < 0.7:
        sys.exit("rounded up %.3f of inexact values; expected about half" % up_fraction)
    # The op definitions the library registered.
    opdefs = {}
    try:
        from tensorflow.core.framework import op_def_pb2
        from tensorflow.python.client import pywrap_tf_session as c_api
        buf = c_api.TF_GetAllOpList()
        try:
            ops = op_def_pb2.OpList.FromString(bytes(c_api.TF_GetBuffer(buf)))
        finally:
            c_api.TF_DeleteBuffer(buf)
        for op in ops.op:
            if op.name.startswith("TfBf16"):
                opdefs[op.name] = op.SerializeToString(deterministic=True).hex()
    except Exception as e:  # private API: fall back to the Python wrappers' names
        print("note: op definitions not compared (%s)" % e, file=sys.stderr)
        opdefs = {n: "" for n in dir(module)
                  if n.startswith("tf_bf16_") and not n.endswith("_eager_fallback")}
    np.save(out + ".npy", bits)
    with open(out + ".json", "w") as f:
        json.dump({"library": lib, "opdefs": opdefs, "elements": int(bits.size),
                   "up_fraction": up_fraction}, f)


def compare(a, b):
    import numpy as np
    ja, jb = (json.load(open(p + ".json")) for p in (a, b))
    if sorted(ja["opdefs"]) != sorted(jb["opdefs"]):
        sys.exit("different ops: %s vs %s" % (sorted(ja["opdefs"]), sorted(jb["opdefs"])))
    differing = [n for n in ja["opdefs"] if ja["opdefs"][n] != jb["opdefs"][n]]
    if differing:
        sys.exit("different op definitions: %s" % differing)
    ya, yb = np.load(a + ".npy"), np.load(b + ".npy")
    mismatches = int((ya != yb).sum())
    if mismatches:
        sys.exit("%d of %d elements differ (first at flat index %d)" % (
            mismatches, ya.size, int(np.flatnonzero((ya != yb).ravel())[0])))
    print("%d ops with identical definitions, %d outputs bit-identical" % (
        len(ja["opdefs"]), ya.size))


def flags(aquery_json, tf_include, build_info_json=None):
    """The Bazel compile lines against setup.py's (its _build_info.json)."""
    tf_include = os.path.realpath(tf_include)
    bookkeeping_pairs = {"-MF", "-iquote", "-isystem", "-c", "-o"}
    bookkeeping = {"-MD", "-fno-canonical-system-headers", "-Wno-builtin-macro-redefined"}
    warnings_only = ""
    actions = [a for a in json.load(open(aquery_json))["actions"] if a["mnemonic"] == "CppCompile"]
    if len(actions) != 3:  # op definitions, CPU kernels, XLA lowering
        sys.exit("expected 3 compile actions, aquery found %d" % len(actions))
    if build_info_json:
        expected = set()
        for flag in json.load(open(build_info_json))["compile_flags"]:
            path = os.path.realpath(flag[2:]) if flag.startswith("-I") else ""
            if path == tf_include or path.startswith(tf_include + os.sep):
                # TensorFlow's include dir and the XLA headers' subdirectories of it.
                expected.add("-isystem external/local_config_tf/include" + path[len(tf_include):])
            elif flag.startswith("-I") and os.path.isfile(os.path.join(flag[2:], "setup.py")):
                expected.add("-I.")  # the repository root: Bazel compiles in it
            else:
                expected.add(flag)
    for action in actions:
        args = action["arguments"][1:]
        source = args[args.index("-c") + 1]
        actual = set()
        i = 0
        while i < len(args):
            if args[i] == "-isystem" and args[i + 1].startswith("external/local_config_tf/include"):
                actual.add("-isystem " + args[i + 1])
            if args[i] in bookkeeping_pairs:
                i += 2
                continue
            if not (args[i] in bookkeeping or args[i].startswith("-frandom-seed=") or
                    args[i].startswith(("-D__DATE__=", "-D__TIME__=", "-D__TIMESTAMP__="))):
                actual.add(args[i])
            i += 1
        if "-ffp-contract=off" not in actual:
            sys.exit("%s is compiled without -ffp-contract=off" % source)
        if build_info_json:
            # Warning options (-W...) change no code: a difference there is a note.
            missing, extra = sorted(expected - actual), sorted(actual - expected)
            if [f for f in missing + extra if not f.startswith("-W")]:
                sys.exit("%s: flags of setup.py missing %s, extra %s" % (source, missing, extra))
            if missing or extra:
                warnings_only = " except warning options: missing %s, extra %s" % (missing, extra)
    if build_info_json:
        print("compile flags of all 3 sources = setup.py's (%s)%s" % (
            " ".join(sorted(expected)), warnings_only))
    else:
        print("-ffp-contract=off present (no tf_bf16/_build_info.json to compare all flags with)")


if __name__ == "__main__":
    {"probe": probe, "compare": compare, "flags": flags}[sys.argv[1]](*sys.argv[2:])
PYEOF

"$PYTHON_BIN_PATH" "$TMP/check.py" probe "$BAZEL_SO" "$TMP/bazel" > "$TMP/bazel.out" 2>&1 \
    || { tail -20 "$TMP/bazel.out"; fail "the Bazel-built library does not load or run: $(tail -1 "$TMP/bazel.out")"; }
N_OPS=$("$PYTHON_BIN_PATH" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["opdefs"]))' "$TMP/bazel.json")
echo "bazel_build: tf.load_op_library loaded it ($N_OPS ops); tf_bf16_stochastic_round ran on 256x257 float32, rounded stochastically, and gave the same bits under jit_compile=True"

# The compile lines Bazel ran, against the flags setup.py recorded.
EXECROOT=$(bazel_cmd info execution_root 2>/dev/null) || fail "bazel info execution_root"
bazel_cmd aquery --output=jsonproto 'mnemonic("CppCompile", deps(//:tf_bf16_ops))' \
    > "$TMP/aquery.json" 2> "$TMP/aquery.err" || { tail -20 "$TMP/aquery.err"; fail "bazel aquery"; }
BUILD_INFO=""
[ -n "$SETUP_SO" ] && [ -f "$ROOT/tf_bf16/_build_info.json" ] && BUILD_INFO="$ROOT/tf_bf16/_build_info.json"
FLAGS=$("$PYTHON_BIN_PATH" "$TMP/check.py" flags "$TMP/aquery.json" \
        "$EXECROOT/external/local_config_tf/include" $BUILD_INFO 2>&1) \
    || { [ -z "$BUILD_INFO" ] || [ -z "$(find "$ROOT/setup.py" -newer "$BUILD_INFO")" ] \
             || echo "bazel_build: note: setup.py is newer than $BUILD_INFO (rebuild: make build)"
         fail "compile flags: $FLAGS"; }
echo "bazel_build: $FLAGS"

if [ -n "$SETUP_SO" ] && [ -f "$SETUP_SO" ]; then
    STALE=$(find "$ROOT/cc" -newer "$SETUP_SO" -type f | head -3 | tr '\n' ' ')
    "$PYTHON_BIN_PATH" "$TMP/check.py" probe "$SETUP_SO" "$TMP/setup" > "$TMP/setup.out" 2>&1 \
        || { tail -20 "$TMP/setup.out"; fail "setup.py's library $SETUP_SO does not load or run: $(tail -1 "$TMP/setup.out")"; }
    if ! RESULT=$("$PYTHON_BIN_PATH" "$TMP/check.py" compare "$TMP/bazel" "$TMP/setup" 2>&1); then
        [ -z "$STALE" ] || echo "bazel_build: note: setup.py's library is older than $STALE(rebuild it: make build)"
        fail "Bazel's and setup.py's libraries differ: $RESULT"
    fi
    COMPARED="vs setup.py's $(basename "$SETUP_SO"): $RESULT"
else
    COMPARED="setup.py's tf_bf16/_tf_bf16_ops*.so not built, nothing to compare with"
fi

echo "bazel_build: OK: //:tf_bf16_ops built in ${BUILD_S} s and loaded; $COMPARED (total $(( $(date +%s) - T0 )) s)"
