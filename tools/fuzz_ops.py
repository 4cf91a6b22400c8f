"""Coverage-guided fuzzing of tf_bf16's Python entry points with atheris (libFuzzer).

    python tools/fuzz_ops.py -max_total_time=600 -seed=1 [CORPUS_DIR]
    python tools/fuzz_ops.py -runs=2000 -seed=1          # a bounded run
    TF_BF16_FUZZ_FINDINGS=findings.txt python tools/fuzz_ops.py ...   # log, go on

Each input picks an implementation -- `tf_bf16.ops` eagerly, `tf_bf16.ops` inside a
`tf.function`, or `tf_bf16.jax_ops` -- and an op (stochastic_round,
rounded_assign_add, apply_sgd, apply_adam, apply_lion), then builds its arguments
from the fuzzer's bytes: variable and gradient dtypes (bfloat16, float32, and
others that must be refused), shapes (matching or not), slots that are missing,
wrongly shaped or typed, or the same variable in two roles, sparse gradients
with indices of any value and dtype, scalars of every kind (NaN, +-Inf, -0,
subnormals, 3e38, negative, Python/NumPy numbers, tensors of any shape and
dtype, strings, None, bools), seeds/steps/var_ids inside and outside int64, and
rounding names.

It reports (raises, so that libFuzzer saves the input and stops) any outcome
other than the documented ones:

- success;
- `tf.errors.InvalidArgumentError`, `ValueError` or `TypeError` whose message
  names an input (one of ARGUMENT_NAMES, quoted as the library quotes them) and
  after which every variable of the call holds exactly the bits it held before.

Only tf_bf16's own modules are instrumented for coverage (TensorFlow, JAX and
Keras are not). The fuzzer's memory limit is raised: TensorFlow and JAX in one
process use more than libFuzzer's default 2 GB.
"""

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import atheris  # noqa: E402

with atheris.instrument_imports(include=["tf_bf16"]):
    import numpy as np
    import tensorflow as tf

    from tf_bf16 import jax_ops
    from tf_bf16 import ops

import jax.numpy as jnp  # noqa: E402

OPS = ["stochastic_round", "rounded_assign_add", "apply_sgd", "apply_adam", "apply_lion"]
# One input in eight runs in a tf.function: each traces a new function, which
# TensorFlow keeps in its function library (memory grows with every trace).
IMPLEMENTATIONS = ["graph", "jax", "jax", "jax", "eager", "eager", "eager", "eager"]
ROUNDINGS = ["nearest", "stochastic", "kahan", "kahan", "stochastic", "Nearest", "", None, 3]
TF_DTYPES = [tf.bfloat16, tf.float32, tf.bfloat16, tf.float32, tf.float16, tf.float64, tf.int32]
SPECIAL_FLOATS = [0.0, -0.0, 1e-3, 0.9, 0.999, 1.0, 1.5, -1.0, -1e-30, 1e-45, -1e-45,
                  3e38, 3.4028235e38, float("nan"), float("inf"), float("-inf"), 1e39]
SPECIAL_INTS = [0, 1, -1, -2, 2**31 - 1, 2**31, -2**31 - 1, 2**32, 2**63 - 2, 2**63 - 1, 2**63,
                -2**63, -2**63 - 1, 2**64, 2**80]

# The names an error may use for an input: Python argument names and op input names.
ARGUMENT_NAMES = [
    "variable", "var", "gradient", "gradient.values", "grad", "delta", "x", "learning_rate",
    "lr", "momentum", "beta_1", "beta_2", "beta1", "beta2", "one_minus_beta1",
    "one_minus_beta2", "beta1_power", "beta2_power", "epsilon", "weight_decay", "seed",
    "step", "var_id", "m", "v", "vhat", "accumulator", "accum", "compensation", "rounding",
    "indices", "nesterov", "Tgrad", "Tdelta", "T", "Tindices"]
_NAMED = re.compile(r"['`](" + "|".join(re.escape(n) for n in ARGUMENT_NAMES) + r")['`\[]|"
                    r"\b(rounding|indices|nesterov|compensation)\b")


class Finding(AssertionError):
    """An outcome the library does not document."""


class Builder:
    """Arguments of one call, from the fuzzer's bytes."""

    def __init__(self, data, implementation):
        self.fdp = atheris.FuzzedDataProvider(data)
        self.jax = implementation == "jax"
        self.variables = []          # (role, tf.Variable) to check after a failure

    def pick(self, values):
        return self.fdp.PickValueInList(values)

    def shape(self, rank=None):
        rank = self.fdp.ConsumeIntInRange(0, 3) if rank is None else rank
        return tuple(self.fdp.ConsumeIntInRange(0, 4) for _ in range(rank))

    def values(self, shape):
        n = int(np.prod(shape, dtype=np.int64))
        raw = self.fdp.ConsumeBytes(4 * n)
        raw += bytes(4 * n - len(raw))
        return np.frombuffer(raw, np.uint32).reshape(shape).view(np.float32)

    def tensor(self, shape, dtype):
        values = self.values(shape)
        if dtype == tf.bfloat16:
            return tf.bitcast(tf.constant((values.view(np.uint32) >> 16).astype(np.uint16)),
                              tf.bfloat16)
        if dtype.is_floating:
            return tf.cast(tf.constant(values), dtype)
        return tf.constant(values.view(np.int32) % 7, dtype)

    def array(self, shape, dtype):
        value = self.tensor(shape, dtype)
        return jnp.asarray(value.numpy()) if dtype != tf.bfloat16 else jnp.asarray(
            tf.bitcast(value, tf.uint16).numpy()).view(jnp.bfloat16)

    def state(self, role, shape, dtype):
        if self.jax:
            return self.array(shape, dtype)
        variable = tf.Variable(self.tensor(shape, dtype), name=role)
        self.variables.append((role, variable))
        return variable

    def slot(self, role, shape, dtype, others):
        choice = self.fdp.ConsumeIntInRange(0, 9)
        if choice == 0 and others:               # the same variable in two roles
            return self.pick(others)
        if choice == 1:
            return self.state(role, self.shape(), dtype)
        if choice == 2:
            return self.state(role, shape, self.pick(TF_DTYPES))
        if choice == 3:
            return None
        return self.state(role, shape, dtype)

    def scalar(self, typical):
        kind = self.fdp.ConsumeIntInRange(0, 12)
        if kind <= 4:
            return typical
        if kind == 5:
            return self.pick(SPECIAL_FLOATS)
        if kind == 6:
            return self.fdp.ConsumeRegularFloat()
        if kind == 7:
            return np.float64(self.pick(SPECIAL_FLOATS))
        if kind == 8:
            return self.pick([np.float16(0.5), np.int64(1), np.int8(-3), True, None, "0.1",
                              [0.1], (0.1, 0.2)])
        if kind == 9:
            return self._scalar_tensor(self.pick(SPECIAL_FLOATS + [typical]))
        if kind == 10:
            return self.fdp.ConsumeIntInRange(-5, 5)
        if kind == 11:
            shape = self.shape()
            return self._tensor_of(self.values(shape), self.pick(TF_DTYPES))
        return self.pick(SPECIAL_INTS)

    def integer(self, typical):
        kind = self.fdp.ConsumeIntInRange(0, 9)
        if kind <= 3:
            return typical
        if kind == 4:
            return self.pick(SPECIAL_INTS)
        if kind == 5:
            return self.fdp.ConsumeIntInRange(-2**64, 2**64)
        if kind == 6:
            return self.pick([np.int64(5), np.uint64(2**63), np.int32(-1), np.uint8(3),
                              np.bool_(True), True, 1.5, None, "3", np.float32(2)])
        if kind == 7:
            value = self.pick(SPECIAL_INTS[:13])
            dtype = self.pick(["int64", "int32", "uint32", "uint64", "float32", "int8"])
            try:
                array = np.array(value).astype(dtype)
            except OverflowError:
                array = np.array(0, dtype)
            return jnp.asarray(array) if self.jax else tf.constant(array)
        if kind == 8:
            return self._tensor_of(np.arange(self.fdp.ConsumeIntInRange(0, 3)), None, int)
        return self.fdp.ConsumeIntInRange(-2**63, 2**63 - 1)

    def _scalar_tensor(self, value):
        dtype = self.pick([tf.float32, tf.float64, tf.bfloat16, tf.float16, tf.int32])
        try:
            array = np.array(value, np.float64)
            if not dtype.is_floating:
                array = np.nan_to_num(array).clip(-2**31, 2**31 - 1)
            return self._tensor_of(array, dtype)
        except (ValueError, OverflowError):
            return value

    def _tensor_of(self, array, dtype, kind=float):
        if self.jax:
            np_dtype = np.int32 if kind is int else (
                jnp.bfloat16 if dtype == tf.bfloat16 else (dtype.as_numpy_dtype if dtype
                                                           else np.float32))
            return jnp.asarray(np.asarray(array).astype(np_dtype))
        if kind is int:
            return tf.constant(np.asarray(array, np.int64))
        return tf.cast(tf.constant(np.asarray(array, np.float64)), dtype)

    def gradient(self, shape, rows_ok=True):
        kind = self.fdp.ConsumeIntInRange(0, 9)
        dtype = self.pick(TF_DTYPES) if kind == 0 else self.pick([tf.float32, tf.bfloat16])
        if kind == 1:
            shape = self.shape()
        if kind == 2 and not self.jax:
            return self.sparse(shape, dtype)
        return self.array(shape, dtype) if self.jax else self.tensor(shape, dtype)

    def sparse(self, shape, dtype):
        count = self.fdp.ConsumeIntInRange(0, 4)
        indices = [self.pick([0, 1, 2, 3, -1, 4, 7, -2**31, 2**31 - 1, 2**40])
                   for _ in range(count)]
        index_dtype = self.pick([tf.int64, tf.int32, tf.int32, tf.float32])
        if index_dtype == tf.int32:
            indices = [int(np.int64(i).astype(np.int32)) for i in indices]
        row = tuple(shape[1:]) if len(shape) else ()
        if self.fdp.ConsumeBool():
            row = self.shape()
        values = self.tensor((count,) + row, dtype)
        dense_shape = tf.constant(shape if len(shape) else (1,), tf.int64)
        return tf.IndexedSlices(values, tf.constant(indices, index_dtype), dense_shape)


def _call(op, b, implementation):
    module = jax_ops if implementation == "jax" else ops
    dtype = b.pick(TF_DTYPES)
    shape = b.shape()
    if op == "stochastic_round":
        x = b.array(shape, b.pick(TF_DTYPES)) if b.jax else b.tensor(shape, b.pick(TF_DTYPES))
        return lambda: module.stochastic_round(x, b.integer(1), b.integer(2), b.integer(3))
    variable = b.state("variable", shape, dtype)
    roles = [variable]
    rounding = b.pick(ROUNDINGS)
    compensation = None
    if rounding == "kahan" or b.fdp.ConsumeIntInRange(0, 5) == 0:
        compensation = b.slot("compensation", shape, tf.bfloat16, roles)
    gradient = b.gradient(shape)
    stream = dict(seed=b.integer(1), var_id=b.integer(0))
    if op == "rounded_assign_add":
        return lambda: module.rounded_assign_add(variable, gradient, rounding=rounding,
                                                 compensation=compensation,
                                                 step=b.integer(3), **stream)
    if op == "apply_sgd":
        accumulator = b.slot("accumulator", shape, dtype, roles)
        return lambda: module.apply_sgd(
            variable, gradient, b.scalar(0.1), momentum=b.scalar(0.9), accumulator=accumulator,
            nesterov=b.fdp.ConsumeBool(), weight_decay=b.scalar(0.0), rounding=rounding,
            compensation=compensation, step=b.integer(3), **stream)
    if op == "apply_adam":
        m = b.slot("m", shape, dtype, roles)
        v = b.slot("v", shape, dtype, roles + [m])
        vhat = b.slot("vhat", shape, dtype, roles + [m, v]) if b.fdp.ConsumeBool() else None
        return lambda: module.apply_adam(
            variable, gradient, m, v, b.scalar(1e-3), beta_1=b.scalar(0.9),
            beta_2=b.scalar(0.999), epsilon=b.scalar(1e-7), step=b.integer(3), vhat=vhat,
            weight_decay=b.scalar(0.0), rounding=rounding, compensation=compensation,
            **stream)
    m = b.slot("m", shape, dtype, roles)
    return lambda: module.apply_lion(
        variable, gradient, m, b.scalar(1e-3), beta_1=b.scalar(0.9), beta_2=b.scalar(0.99),
        weight_decay=b.scalar(0.0), rounding=rounding, compensation=compensation,
        step=b.integer(3), **stream)


def _bits(variable):
    return np.atleast_1d(np.asarray(variable.numpy())).view(np.uint8).copy()


FINDINGS = os.environ.get("TF_BF16_FUZZ_FINDINGS")


def test_one_input(data):
    """libFuzzer's target: a Finding stops the run (and saves the input), unless
    TF_BF16_FUZZ_FINDINGS names a file, where each distinct finding is appended
    (its first line) and the run goes on -- for long campaigns."""
    try:
        check_one_input(data)
    except Finding as finding:
        if not FINDINGS:
            raise
        line = str(finding).splitlines()[0][:300]
        with open(FINDINGS, "a+") as f:
            f.seek(0)
            if line not in f.read().splitlines():
                f.write(line + "\n")


def check_one_input(data):
    """Runs one input; raises Finding on an undocumented outcome."""
    implementation = IMPLEMENTATIONS[data[0] % len(IMPLEMENTATIONS)] if data else "eager"
    b = Builder(data[1:], implementation)
    op = b.pick(OPS)
    try:
        call = _call(op, b, implementation)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError):
        return    # the fuzzer's own argument building (e.g. a tensor of an odd dtype)
    before = [(role, v, _bits(v)) for role, v in b.variables]
    if implementation == "graph":
        @tf.function(autograph=False)
        def run():
            call()
    else:
        run = call
    try:
        run()
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
        message = str(error)
        if not _NAMED.search(message):
            raise Finding(f"{implementation} {op}: {type(error).__name__} names no input: "
                          f"{message[:600]}") from error
        for role, variable, bits in before:
            if not np.array_equal(_bits(variable), bits):
                raise Finding(f"{implementation} {op}: '{role}' changed by a refused call "
                              f"({type(error).__name__}: {message[:300]})") from error


def main(argv):
    if "-rss_limit_mb" not in " ".join(argv):
        argv = argv + ["-rss_limit_mb=8192"]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
