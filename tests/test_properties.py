"""Property tests (hypothesis) of the rounding specification, docs/rounding.md.

- **SR neighbours** (section 2): `stochastic_round(x)` is one of the two bf16
  neighbours of x (truncation, or the next bf16 away from zero); exact bf16
  values, +-0 and +-Inf are unchanged; every NaN becomes the canonical NaN.
- **SR unbiasedness**: the mean of n draws is within a bound derived below of x.
- **Kahan error bound** (section 4).
- **One specification, four implementations**: the C++ kernels (`tf_bf16.ops`),
  the pure-TF reference, the XLA lowering (`jit_compile=True`) and
  `tf_bf16.jax_ops` give the same bits for every op, rounding, dtype, on random
  shapes and values drawn from all 2**32 float32 patterns (subnormals, +-0, +-Inf,
  NaNs with payloads) plus exact bf16 midpoints (ties) and values near the
  float32 maximum.

Hypothesis runs derandomized (the examples follow from the test's name, the
same on every machine and run) with a fixed number of examples per test, no
example database and no deadline: CI is deterministic and the file runs in
well under two minutes. A failure prints the falsifying example.
"""

import contextlib
import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import bits
from tf_bf16 import _args
from tf_bf16 import ops
from tf_bf16 import reference

from tf_bf16 import jax_ops
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

settings.register_profile(
    "tf_bf16", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile("tf_bf16")

# ---------------------------------------------------------------------------
# Values

SPECIAL_BITS = [
    0x00000000, 0x80000000,                  # +-0
    0x7F800000, 0xFF800000,                  # +-Inf
    0x7FC00000, 0xFFC00000, 0x7FC12345, 0xFF800001, 0x7F8A0000,   # NaNs: payloads, signalling
    0x00000001, 0x807FFFFF, 0x00010000,      # float32 and bf16 subnormals
    0x00800000, 0x80800000,                  # smallest normals
    0x7F7FFFFF, 0xFF7F8000, 0x7F7F7FFF,      # float32 maximum, bf16 maximum and just below
    0x3F808000, 0x3F818000, 0xBF808000,      # exact bf16 midpoints (ties)
]
ANY_BITS = st.integers(0, 2**32 - 1)
TIES = st.integers(0, 2**16 - 1).map(lambda b: (b << 16) | 0x8000)
NEAR_BF16 = st.tuples(st.integers(0, 2**16 - 1), st.sampled_from([0x0001, 0x7FFF, 0x8001,
                                                                 0xFFFF]))
FLOAT32_BITS = st.one_of(ANY_BITS, st.sampled_from(SPECIAL_BITS), TIES,
                         NEAR_BF16.map(lambda t: (t[0] << 16) | t[1]),
                         st.floats(-4.0, 4.0, width=32).map(
                             lambda f: int(np.float32(f).view(np.uint32))))
SHAPES = st.sampled_from([(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (1, 33)])


def f32_array(shape):
    return hnp.arrays(np.uint32, shape, elements=FLOAT32_BITS).map(
        lambda a: a.view(np.float32))


def tf_tensor(values, dtype):
    """A tensor with exactly these bits (bfloat16: the top 16 bits of each float32)."""
    values = np.ascontiguousarray(values, np.float32)
    if dtype == tf.float32:
        return tf.constant(values)
    return tf.bitcast(tf.constant((values.view(np.uint32) >> 16).astype(np.uint16)),
                      tf.bfloat16)


def jax_array(values, dtype):
    values = np.ascontiguousarray(values, np.float32)
    if dtype == tf.float32:
        return jnp.asarray(values)
    return lax.bitcast_convert_type(jnp.asarray((values.view(np.uint32) >> 16)
                                                .astype(np.uint16)), jnp.bfloat16)


def np_bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


# ---------------------------------------------------------------------------
# SR: neighbours and unbiasedness


@settings(PROFILE, max_examples=60)
@given(x=SHAPES.flatmap(f32_array), seed=st.integers(-2**63, 2**63 - 1),
       step=st.integers(-2**63, 2**63 - 1), var_id=st.integers(-2**63, 2**63 - 1))
def test_stochastic_round_gives_a_neighbour(x, seed, step, var_id):
    u = x.view(np.uint32).astype(np.uint64)
    got = bits(ops.stochastic_round(tf.constant(x), seed, step, var_id)).astype(np.uint64)
    down = u >> 16                                         # truncation (toward zero)
    up = down + 1                                          # next bf16 away from zero
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    exact = (u & 0xFFFF) == 0
    assert np.all(got[nan] == 0x7FC0)
    assert np.all(got[exact & ~nan] == down[exact & ~nan])      # bf16 values, +-0, +-Inf
    ok = (got == down) | (got == up)
    assert np.all(ok[~nan]), (x[~ok & ~nan], got[~ok & ~nan])


def bernstein_bound(n, p, delta):
    """t such that P(|k/n - p| >= t) <= delta for k ~ Binomial(n, p) (Bernstein:
    P(|k/n - p| >= t) <= 2 exp(-n t^2 / (2 p (1 - p) + 2 t / 3)))."""
    log_term = math.log(2 / delta)
    a = 2 * log_term / 3
    return (a + math.sqrt(a * a + 8 * n * log_term * p * (1 - p))) / (2 * n)


F32_MAX = float(np.finfo(np.float32).max)
# The two-sided tail of a normal beyond 5 standard errors.
FIVE_SIGMA = math.erfc(5 / math.sqrt(2))      # 5.7e-7
DRAWS = 4096


@settings(PROFILE, max_examples=150)
@given(x=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True,
                   min_value=-F32_MAX, max_value=F32_MAX),
       seed=st.integers(0, 2**63 - 1), step=st.integers(0, 2**40))
def test_stochastic_rounding_is_unbiased(x, seed, step):
    """E[SR(x)] = x. Each of DRAWS elements equal to x gets its own 16 bits; the
    result is the lower neighbour L or the upper U = L + gap, U with probability
    p = l / 2**16 (l: the 16 bits below the bf16 ones, section 2). With k draws
    rounded up, mean - x = gap * (k / n - p), and k ~ Binomial(n, p) if the bits
    are uniform and independent. Five standard errors, gap * 5 sqrt(p (1 - p) / n),
    is the classic bound but the normal approximation behind it fails for small
    n p; the test uses Bernstein's inequality at the same false-alarm probability
    (FIVE_SIGMA, 5.7e-7), which holds for every p and equals 5.5 standard errors
    when n p (1 - p) is large. With 150 examples a false alarm has probability
    below 1e-4; derandomized, the examples are fixed anyway."""
    x = np.float32(x)
    u = int(x.view(np.uint32))
    got = bits(ops.stochastic_round(tf.fill([DRAWS], x), seed, step, 3)).astype(np.uint32)
    lower = np.uint32(u & 0xFFFF0000).view(np.float32).astype(np.float64)
    upper = np.uint32((u & 0xFFFF0000) + 0x10000).view(np.float32).astype(np.float64)
    p = (u & 0xFFFF) / 65536.0
    k = int(np.sum(got != (u >> 16)))
    if p == 0:
        assert k == 0
        return
    if math.isinf(upper):          # above the largest bf16: rounds up to Inf with p
        assert abs(k / DRAWS - p) <= bernstein_bound(DRAWS, p, FIVE_SIGMA)
        return
    samples = (got.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    mean = samples.mean()          # exact: sums of n bf16 values fit float64 here
    gap = abs(upper - lower)
    assert abs(mean - float(x)) <= gap * bernstein_bound(DRAWS, p, FIVE_SIGMA), (
        f"mean {mean!r} vs x {float(x)!r}: k = {k} of {DRAWS}, p = {p}")


# ---------------------------------------------------------------------------
# Kahan


EPS = 2.0**-8      # bf16's unit roundoff (8 significant bits)
MAGNITUDE = st.floats(2.0**-20, 2.0**10, width=32)


@settings(PROFILE, max_examples=60)
@given(w0=MAGNITUDE, signs=st.lists(st.booleans(), min_size=1, max_size=128),
       magnitudes=st.lists(MAGNITUDE, min_size=128, max_size=128), data=st.data())
def test_kahan_error_bound(w0, signs, magnitudes, data):
    """docs/rounding.md section 4: Kahan summation in precision eps has error bound
    (2 eps + O(n eps^2)) * sum |x| (Goldberg 1991, Theorem 8; Higham 2002, section
    4.3), here with eps = 2**-8 and the second-order term written n * eps**2: for
    n <= 128 increments it is at most eps / 2, and the bound checked is
    (2 + n eps) * eps * (|w0| + sum |u_i|), with u_i = RNE(delta_i), the bf16
    increments Kahan adds (the delta is rounded first, section 4), and the exact
    sum w0 + sum u_i computed in float64 (exactly: 8-bit significands over this
    exponent range). Magnitudes stay in [2**-20, 2**10], far from subnormals
    (flushed) and overflow, where the bound does not apply."""
    n = len(signs)
    deltas = np.array([m if s else -m for s, m in zip(signs, magnitudes[:n])], np.float32)
    w = tf.Variable(tf.cast(tf.constant(np.float32(w0)), tf.bfloat16))
    c = tf.Variable(tf.zeros([], tf.bfloat16))
    start = float(w.numpy())
    for delta in deltas:
        ops.rounded_assign_add(w, tf.constant(delta), rounding="kahan", compensation=c)
    increments = tf.cast(tf.constant(deltas), tf.bfloat16).numpy().astype(np.float64)
    exact = start + increments.sum()
    error = abs(float(w.numpy()) - exact)
    bound = (2 + n * EPS) * EPS * (abs(start) + np.abs(increments).sum())
    assert error <= bound, f"error {error} > bound {bound} after {n} increments"


# ---------------------------------------------------------------------------
# Kernel == reference == XLA == jax_ops


BETAS = [0.9, 0.95, 0.99, 0.999]   # the pow(beta, step + 1) domain checked equal across
MAX_ADAM_STEP = 4095               # TF and XLA/JAX (docs/rounding.md 9: 4,096 steps)
ROLES = {"assign_add": [], "sgd": ["accumulator"], "adam": ["m", "v", "vhat"],
         "lion": ["m"]}
DTYPES = {"bfloat16": tf.bfloat16, "float32": tf.float32}


@st.composite
def cases(draw):
    op = draw(st.sampled_from(sorted(ROLES)))
    shape = draw(SHAPES)
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    case = dict(op=op, shape=shape, dtype=dtype,
                gdtype=draw(st.sampled_from(sorted(DTYPES))),
                rounding=draw(st.sampled_from(["nearest", "stochastic", "kahan"])),
                seed=draw(st.integers(-2**63, 2**63 - 1)),
                var_id=draw(st.integers(-2**63, 2**63 - 1)),
                lr=draw(st.sampled_from([0.0, 1e-3, 0.1]) | st.floats(0, 1, width=32)),
                weight_decay=draw(st.sampled_from([0.0, 0.01]) | st.floats(-1, 1, width=32)))
    case["step"] = draw(st.integers(0, MAX_ADAM_STEP) if op == "adam"
                        else st.integers(-2**63, 2**63 - 1))
    roles = ["variable"] + ROLES[op]
    if op == "sgd":
        case["momentum"] = draw(st.sampled_from([0.0, 0.9]) | st.floats(0, 1, width=32))
        case["nesterov"] = draw(st.booleans())
        if case["momentum"] == 0.0 and draw(st.booleans()):
            roles.remove("accumulator")
            case["nesterov"] = False
    if op == "adam":
        case.update(beta_1=draw(st.sampled_from(BETAS)), beta_2=draw(st.sampled_from(BETAS)),
                    epsilon=draw(st.sampled_from([1e-7, 0.0]) | st.floats(0, 2.0**-10, width=32)))
        if draw(st.booleans()):
            roles.remove("vhat")
    if op == "lion":
        case.update(beta_1=draw(st.floats(0, 1, width=32)),
                    beta_2=draw(st.floats(0, 1, width=32)))
    if case["rounding"] == "kahan" and dtype == "bfloat16":
        roles.append("compensation")
    case["state"] = {role: draw(f32_array(shape)) for role in roles}
    case["gradient"] = draw(f32_array(shape))
    return case


def _call(module, case, variables, gradient, scalars):
    """The case's op from `module` (tf_bf16.ops, tf_bf16.reference or tf_bf16.jax_ops)."""
    op, get = case["op"], variables.get
    common = dict(rounding=case["rounding"], compensation=get("compensation"),
                  seed=case["seed"], var_id=case["var_id"])
    if op == "assign_add":
        return module.rounded_assign_add(variables["variable"], gradient, step=case["step"],
                                         **common)
    if op == "sgd":
        return module.apply_sgd(variables["variable"], gradient, scalars["lr"],
                                momentum=scalars["momentum"], accumulator=get("accumulator"),
                                nesterov=case["nesterov"], weight_decay=scalars["weight_decay"],
                                step=case["step"], **common)
    if op == "lion":
        return module.apply_lion(variables["variable"], gradient, variables["m"], scalars["lr"],
                                 beta_1=scalars["beta_1"], beta_2=scalars["beta_2"],
                                 weight_decay=scalars["weight_decay"], step=case["step"],
                                 **common)
    return module.apply_adam(variables["variable"], gradient, variables["m"], variables["v"],
                             scalars["lr"], beta_1=case["beta_1"], beta_2=case["beta_2"],
                             epsilon=scalars["epsilon"], step=case["step"], vhat=get("vhat"),
                             weight_decay=scalars["weight_decay"], **common)


def _scalars(case):
    return {k: float(np.float32(case[k])) for k in
            ("lr", "momentum", "weight_decay", "epsilon", "beta_1", "beta_2") if k in case}


def _tf_state(case):
    return {role: tf.Variable(tf_tensor(values, tf.bfloat16 if role == "compensation"
                                        else DTYPES[case["dtype"]]))
            for role, values in case["state"].items()}


def _tf_bits(variables):
    return {role: bits(v) for role, v in variables.items()}


def run_tf(module, case):
    variables = _tf_state(case)
    _call(module, case, variables, tf_tensor(case["gradient"], DTYPES[case["gdtype"]]),
          _scalars(case))
    return _tf_bits(variables)


@contextlib.contextmanager
def _given_powers(powers):
    """Inside: the wrappers use these beta ** (step + 1) (computed eagerly by
    TensorFlow and passed into the compiled function), so that the lowering's
    own math is compared, not XLA's `pow` (docs/rounding.md 8.6)."""
    original = _args.bias_correction_powers
    if powers is not None:
        _args.bias_correction_powers = lambda *_: powers
    try:
        yield
    finally:
        _args.bias_correction_powers = original


_XLA = {}


def run_xla(case):
    """The op inside tf.function(jit_compile=True). Learning rate, momentum, epsilon,
    weight decay, seed, step, var_id (and Adam's powers) are run-time inputs, the
    variables arguments: one compiled function per structure, reused by examples."""
    key = (case["op"], case["rounding"], case.get("nesterov"), case.get("beta_1"),
           case.get("beta_2"))
    if key not in _XLA:
        structure = dict(case)

        def update(variables, gradient, scalars, stream):
            powers = (stream["beta_1_power"], stream["beta_2_power"]) \
                if "beta_1_power" in stream else None
            with _given_powers(powers):
                _call(ops, dict(structure, seed=stream["seed"], step=stream["step"],
                                var_id=stream["var_id"]), variables, gradient, scalars)

        _XLA[key] = tf.function(update, jit_compile=True, reduce_retracing=True)
    variables = _tf_state(case)
    scalars = {k: (v if k in ("beta_1", "beta_2") and case["op"] == "adam"
                   else tf.constant(v, tf.float32)) for k, v in _scalars(case).items()}
    stream = {k: tf.constant(case[k], tf.int64) for k in ("seed", "step", "var_id")}
    if case["op"] == "adam":
        stream["beta_1_power"], stream["beta_2_power"] = _args.bias_correction_powers(
            case["beta_1"], case["beta_2"], case["step"])
    _XLA[key](variables, tf_tensor(case["gradient"], DTYPES[case["gdtype"]]), scalars, stream)
    return _tf_bits(variables)


def run_jax(case):
    state = {role: jax_array(values, tf.bfloat16 if role == "compensation"
                             else DTYPES[case["dtype"]])
             for role, values in case["state"].items()}
    out = _call(jax_ops, case, state, jax_array(case["gradient"], DTYPES[case["gdtype"]]),
                _scalars(case))
    merged = dict(state, **out)
    return {role: np_bits(merged[role]) for role in state}


@settings(PROFILE, max_examples=80)
@given(case=cases())
def test_kernel_reference_xla_and_jax_agree_bit_for_bit(case):
    want = run_tf(ops, case)
    for name, got in [("reference", run_tf(reference, case)), ("XLA", run_xla(case)),
                      ("jax_ops", run_jax(case))]:
        for role in want:
            mismatch = np.flatnonzero(want[role].reshape(-1) != got[role].reshape(-1))
            assert mismatch.size == 0, (
                f"{name} != kernel for {role}: {mismatch.size} elements, first at "
                f"{mismatch[0]}: {got[role].reshape(-1)[mismatch[0]]:#x} vs "
                f"{want[role].reshape(-1)[mismatch[0]]:#x}")


@settings(PROFILE, max_examples=40)
@given(x=SHAPES.flatmap(f32_array), seed=st.integers(-2**63, 2**63 - 1),
       step=st.integers(-2**63, 2**63 - 1), var_id=st.integers(-2**63, 2**63 - 1))
def test_stochastic_round_agrees_everywhere(x, seed, step, var_id):
    want = bits(ops.stochastic_round(tf.constant(x), seed, step, var_id))
    assert np.array_equal(bits(reference.stochastic_round(tf.constant(x), seed, step, var_id)),
                          want)
    xla = tf.function(ops.stochastic_round, jit_compile=True, reduce_retracing=True)
    assert np.array_equal(bits(xla(tf.constant(x), tf.constant(seed, tf.int64),
                                   tf.constant(step, tf.int64), tf.constant(var_id, tf.int64))),
                          want)
    assert np.array_equal(np_bits(jax_ops.stochastic_round(jnp.asarray(x), seed, step, var_id)),
                          want)
