"""Exports jit-compiled tf_bf16 train steps as HLO, with inputs and CPU results.

For XLA on GPU without TensorFlow (issue 9 item 6): each case is a
``tf.function(jit_compile=True)`` that runs three steps of a tf_bf16 update
(or stochastic_round) and returns the updated tensors. This tool, run where
TensorFlow is installed:

1. runs the same three steps with the CPU kernels, eagerly: the expected bits;
2. runs the jit-compiled function on XLA:CPU and checks that it gives exactly
   those bits (it must: tests/test_xla_lowering.py);
3. saves the function's HLO (``experimental_get_compiler_ir(...)(stage=
   "hlo_serialized")``), rewritten for JAX 0.11's ``hlo_to_stablehlo``: the
   ``copy`` instructions it refuses are bypassed and removed, and metadata
   (local source paths) is cleared;
4. saves the HLO's parameters in ``parameter(k)`` order (the function's
   arguments, then its captured variables) and the expected outputs, as bit
   patterns, with a manifest.

tools/xla_hlo_run_jax.py compiles each module with JAX's XLA client on any
backend (the H200 GPU, or JAX's CPU backend here) and compares the bits.

Adam's bias-correction powers are arguments of the exported steps, computed
here with TensorFlow: the wrapper's tf.pow would otherwise be compiled into
the HLO, and XLA's pow differs between backends and from TensorFlow's in the
last bit (docs/rounding.md 8.6); the powers are the op's inputs, not part of
the lowering under test.

The ``control_naive_multiply_add`` case is plain TensorFlow arithmetic, not a
tf_bf16 op: ``a * b + c`` and a product that underflows, with TensorFlow's
eager CPU results (rounded after each operation, denormals flushed) as the
reference. It shows whether the backend running the HLO contracts multiply-
adds and keeps denormals, i.e. that the comparison would see it if the
lowering were exposed to either.

Usage: python tools/xla_hlo_export.py [--out out/xla_hlo] [--elements N]
Not a test and not part of the library; the files it writes are not tracked.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import zlib

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402
from tensorflow.compiler.xla.service import hlo_pb2  # noqa: E402

from tf_bf16 import _args  # noqa: E402
from tf_bf16 import ops  # noqa: E402

STEPS = 3
SEED, VAR_ID, FIRST_STEP = 2**33 + 7, 5, 40
LR = 0.0137


# ---------------------------------------------------------------------------
# Data: every kind of value in every tensor, at random positions.

def values(rng, n, scale=1.0, special=True):
    """float32: normal values at several scales, and (special) subnormals, +-0,
    huge values, ties for bf16 rounding, NaNs and infinities."""
    x = (rng.standard_normal(n) * scale * 10.0 ** rng.integers(-3, 2, n)).astype(np.float32)
    if special:
        pool = np.array([1e-39, -1e-40, 1.1754942e-38, 3e-36, 0.0, -0.0, 3.0e38, -3.3e38,
                         1.0 + 2.0**-8, -(1.0 + 3 * 2.0**-8), np.inf, -np.inf, np.nan],
                        np.float32)
        pick = rng.random(n) < 0.05
        x[pick] = rng.choice(pool, n)[pick]
    return x


def bf16(x):
    """float32 -> bfloat16 by truncation of the bit pattern (any bits, exactly)."""
    return tf.bitcast(tf.constant((np.asarray(x, np.float32).view(np.uint32) >> 16)
                                  .astype(np.uint16)), tf.bfloat16)


def as_bits(t):
    """(bit pattern as an unsigned or integer array, dtype name)."""
    a = np.asarray(t.numpy() if hasattr(t, "numpy") else t)
    if a.dtype.itemsize == 2:
        return a.view(np.uint16), "bfloat16"
    if a.dtype == np.float32:
        return a.view(np.uint32), "float32"
    return a, a.dtype.name


# ---------------------------------------------------------------------------
# Cases. Each builds fresh variables (same values every time) and returns
# (variables dict, arguments tuple, step function(args) -> returned tensors).

@contextlib.contextmanager
def beta_powers_from(powers):
    """Makes the wrappers take beta ** (step + 1) from `powers` ([STEPS, 2])
    in call order, instead of computing it with tf.pow."""
    original = _args.bias_correction_powers
    calls = iter(range(STEPS))

    def from_argument(beta_1, beta_2, step):
        k = next(calls)
        return powers[k, 0], powers[k, 1]

    _args.bias_correction_powers = from_argument
    try:
        yield
    finally:
        _args.bias_correction_powers = original


def tensorflow_beta_powers(beta_1, beta_2):
    t = tf.range(FIRST_STEP + 1, FIRST_STEP + STEPS + 1, dtype=tf.float32)
    return tf.stack([tf.pow(tf.constant(beta_1), t), tf.pow(tf.constant(beta_2), t)], axis=1)


def dense_case(kind, n, dtype, rounding, gdtype=tf.float32, **kw):
    slots = {"sgd": ["accum"], "adam": ["m", "v"] + (["vhat"] if kw.get("amsgrad") else []),
             "lion": ["m"]}[kind]

    def build(rng):
        variables = {"var": tf.Variable(_cast(values(rng, n), dtype), name="var")}
        for slot in slots:
            init = values(rng, n, 0.1)
            if slot in ("v", "vhat"):
                init = np.abs(init)
            variables[slot] = tf.Variable(_cast(init, dtype), name=slot)
        if rounding == "kahan" and dtype == tf.bfloat16:
            variables["compensation"] = tf.Variable(bf16(values(rng, n, 1e-3)), name="comp")
        grads = _cast(np.stack([values(rng, n) for _ in range(STEPS)]), gdtype)
        args = (grads, tf.constant(LR), tf.constant(FIRST_STEP, tf.int64))
        if kind == "adam":
            args += (tensorflow_beta_powers(0.9, 0.999),)
        return variables, args

    def step(variables, grads, lr, first_step, powers=None):
        comp = variables.get("compensation")
        common = dict(rounding=rounding, compensation=comp, seed=SEED, var_id=VAR_ID)
        with beta_powers_from(powers) if powers is not None else contextlib.nullcontext():
            for k in range(STEPS):
                s = first_step + k
                if kind == "sgd":
                    ops.apply_sgd(variables["var"], grads[k], lr, momentum=0.9,
                                  accumulator=variables["accum"], nesterov=True,
                                  weight_decay=kw.get("weight_decay", 0.0), step=s, **common)
                elif kind == "lion":
                    ops.apply_lion(variables["var"], grads[k], variables["m"], lr,
                                   weight_decay=kw.get("weight_decay", 0.0), step=s, **common)
                else:
                    ops.apply_adam(variables["var"], grads[k], variables["m"], variables["v"],
                                   lr, step=s, vhat=variables.get("vhat"),
                                   weight_decay=kw.get("weight_decay", 0.0), **common)
        return [v.read_value() for v in variables.values()]

    return build, step


def sparse_adam_case(n_rows, row_size, dtype, rounding):
    def build(rng):
        n = n_rows * row_size
        variables = {"var": tf.Variable(_cast(values(rng, n).reshape(n_rows, row_size), dtype))}
        for slot in ("m", "v", "vhat"):
            init = values(rng, n, 0.1).reshape(n_rows, row_size)
            variables[slot] = tf.Variable(_cast(np.abs(init) if slot != "m" else init, dtype))
        if rounding == "kahan" and dtype == tf.bfloat16:
            variables["compensation"] = tf.Variable(
                bf16(values(rng, n, 1e-3).reshape(n_rows, row_size)))
        num = 3 * n_rows // 4
        indices = rng.integers(0, n_rows, (STEPS, num))
        indices[:, :5] = 7                         # a row five times per step
        grads = tf.constant(np.stack([values(rng, num * row_size).reshape(num, row_size)
                                      for _ in range(STEPS)]))
        return variables, (grads, tf.constant(indices, tf.int64), tf.constant(LR),
                           tf.constant(FIRST_STEP, tf.int64), tensorflow_beta_powers(0.9, 0.999))

    def step(variables, grads, indices, lr, first_step, powers):
        with beta_powers_from(powers):
            for k in range(STEPS):
                ops.apply_adam(variables["var"], tf.IndexedSlices(grads[k], indices[k]),
                               variables["m"], variables["v"], lr, step=first_step + k,
                               vhat=variables["vhat"], weight_decay=0.01, rounding=rounding,
                               compensation=variables.get("compensation"), seed=SEED,
                               var_id=VAR_ID)
        return [v.read_value() for v in variables.values()]

    return build, step


def stochastic_round_case(n):
    def build(rng):
        return {}, (tf.constant(values(rng, n)), tf.constant(SEED, tf.int64),
                    tf.constant(FIRST_STEP, tf.int64))

    def step(variables, x, seed, first_step):
        return [ops.stochastic_round(x, seed, first_step + k, VAR_ID) for k in range(STEPS)]

    return build, step


def control_case(n):
    """Plain TensorFlow: a * b + c, and a * d (products below 2^-126)."""
    def build(rng):
        a = (1.0 + rng.integers(1, 2**12, n) * 2.0**-12).astype(np.float32)
        c = -(a * a).astype(np.float32) * np.float32(1.0 + 2.0**-20)
        d = np.full(n, 1e-20, np.float32)
        return {}, tuple(tf.constant(x) for x in (a, a, c, d))

    def step(variables, a, b, c, d):
        return [a * b + c, (a * d) * d]

    return build, step


def _cast(x, dtype):
    return bf16(x) if dtype == tf.bfloat16 else tf.constant(np.asarray(x, np.float32))


def cases(n):
    rows = max(8, n // 64)
    return {
        "adam_nearest": dense_case("adam", n, tf.bfloat16, "nearest"),
        "adam_stochastic": dense_case("adam", n, tf.bfloat16, "stochastic", tf.bfloat16),
        "adamw_amsgrad_kahan": dense_case("adam", n, tf.bfloat16, "kahan", amsgrad=True,
                                          weight_decay=0.01),
        "adam_float32": dense_case("adam", n, tf.float32, "nearest"),
        "sgd_nesterov_kahan": dense_case("sgd", n, tf.bfloat16, "kahan", weight_decay=0.01),
        "lion_stochastic": dense_case("lion", n, tf.bfloat16, "stochastic", weight_decay=0.1),
        # Every value float32 and stored exactly: a contracted multiply-add
        # changes the stored bits (no bf16 rounding to hide it).
        "sgd_nesterov_float32_multiply_adds": dense_case("sgd", n, tf.float32, "nearest",
                                                         weight_decay=0.01),
        "lion_float32_multiply_adds": dense_case("lion", n, tf.float32, "nearest",
                                                 weight_decay=0.1),
        "sparse_adam_kahan": sparse_adam_case(rows, 64, tf.bfloat16, "kahan"),
        "stochastic_round": stochastic_round_case(n),
        "control_naive_multiply_add": control_case(n),
    }


# ---------------------------------------------------------------------------
# HLO rewriting for JAX's hlo_to_stablehlo.

def rewrite_for_jax(serialized):
    """Bypasses and removes `copy` instructions, clears metadata."""
    module = hlo_pb2.HloModuleProto.FromString(serialized)
    removed = 0
    for computation in module.computations:
        source = {i.id: i.operand_ids[0] for i in computation.instructions if i.opcode == "copy"}

        def resolve(instruction_id):
            while instruction_id in source:
                instruction_id = source[instruction_id]
            return instruction_id

        kept = [i for i in computation.instructions if i.opcode != "copy"]
        for instruction in kept:
            instruction.operand_ids[:] = [resolve(o) for o in instruction.operand_ids]
            instruction.control_predecessor_ids[:] = sorted(
                {resolve(o) for o in instruction.control_predecessor_ids})
            instruction.ClearField("metadata")
        computation.root_id = resolve(computation.root_id)
        removed += len(computation.instructions) - len(kept)
        del computation.instructions[:]
        computation.instructions.extend(kept)
    return module.SerializeToString(), removed


# ---------------------------------------------------------------------------

def export(name, build, step, out_dir, control):
    t0 = time.time()
    seed = zlib.crc32(name.encode())
    expected_vars, args = build(np.random.default_rng(seed))
    expected = step(expected_vars, *args)               # CPU kernels, eagerly

    xla_vars, _ = build(np.random.default_rng(seed))
    fn = tf.function(lambda *a: step(xla_vars, *a), jit_compile=True)
    captured = fn.get_concrete_function(*args).captured_inputs
    by_handle = {id(v.handle): v for v in xla_vars.values()}
    parameters = [as_bits(p) for p in list(args) + [by_handle[id(h)] for h in captured]]
    serialized = fn.experimental_get_compiler_ir(*args)(stage="hlo_serialized")
    rewritten, copies = rewrite_for_jax(serialized)
    xla_cpu = fn(*args)

    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    with open(os.path.join(case_dir, "module.hlo.pb"), "wb") as f:
        f.write(rewritten)
    params, param_info = {}, []
    for k, (data, dtype) in enumerate(parameters):
        params[f"p{k}"] = data
        param_info.append({"dtype": dtype, "shape": list(data.shape)})
    np.savez(os.path.join(case_dir, "inputs.npz"), **params)
    outputs, output_info, xla_cpu_equal = {}, [], True
    for k, (want, got) in enumerate(zip(expected, xla_cpu)):
        data, dtype = as_bits(want)
        outputs[f"o{k}"] = data
        xla_cpu_equal &= bool(np.array_equal(data, as_bits(got)[0]))
        output_info.append({"dtype": dtype, "shape": list(data.shape)})
    np.savez(os.path.join(case_dir, "expected.npz"), **outputs)
    labels = list(expected_vars) if expected_vars else [f"out{k}" for k in range(len(expected))]
    info = {"parameters": param_info, "outputs": output_info, "output_names": labels,
            "control": control, "xla_cpu_equals_expected": xla_cpu_equal,
            "copies_removed": copies}
    print(f"{name}: {len(parameters)} parameters, {len(expected)} outputs, XLA:CPU "
          f"{'equals' if xla_cpu_equal else 'DIFFERS FROM'} "
          f"{'TensorFlow eager' if control else 'the CPU kernels'}, {copies} copies removed, "
          f"{time.time() - t0:.1f} s", flush=True)
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "xla_hlo"),
                        help="output folder (default: out/xla_hlo, not tracked)")
    parser.add_argument("--elements", type=int, default=2**17 + 3,
                        help="elements per dense tensor (default 131075)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    manifest = {"tensorflow": tf.__version__, "steps": STEPS, "elements": args.elements,
                "cases": {}}
    failed = []
    for name, (build, step) in cases(args.elements).items():
        control = name.startswith("control")
        info = export(name, build, step, args.out, control)
        manifest["cases"][name] = info
        if not control and not info["xla_cpu_equals_expected"]:
            failed.append(name)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out}: {len(manifest['cases'])} cases, {size / 2**20:.1f} MiB")
    if failed:
        print(f"FAILED: XLA:CPU differs from the CPU kernels in {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
