"""With float32 variables the fused tf_bf16 ops give TensorFlow's own results.

float32 variables are updated exactly (the rounding argument is not used), in
the formulation of TensorFlow's training ops (docs/rounding.md, section 5), so
``apply_sgd`` / ``apply_adam`` must equal ``tf.raw_ops.ResourceApplyKerasMomentum``,
``ResourceApplyGradientDescent``, ``ResourceApplyAdam`` (and
``ResourceApplyAdamWithAmsgrad``) and ``ResourceSparseApplyKerasMomentum`` bit
for bit, step after step. bfloat16 gradients are loaded exactly, so they must
give TensorFlow's result for the same gradient cast to float32.

Adam's `1 - beta` is computed as Keras computes it, in beta's own type
(docs/rounding.md 5.3): the Adam tests pass float32 tensors for the betas, for
which that is `ResourceApplyAdam`'s float32 subtraction. (With Python floats
`apply_adam` uses Keras's float64 constant; tests/test_optimizers.py checks
that against Keras's Adam.)

Finite data (normal values at several scales, subnormals, +-0) is compared
bit for bit. Non-finite data (NaN, +-Inf, values that overflow) is compared
bit for bit except for the sign and payload of NaNs, which tf_bf16 makes
canonical by specification and TensorFlow does not (assert_equal_but_nan_bits
says exactly what is checked and why).
"""

import numpy as np
import pytest
import tensorflow as tf

from conftest import DTYPES, assert_bits_equal, bits
from tf_bf16 import ROUNDINGS
from tf_bf16 import ops

LR = 0.0137
MOMENTUM = 0.9
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7
STEPS = 3

# Odd sizes (TensorFlow's Adam falls back to scalar code when the size is not a
# multiple of the SIMD packet), multiples of the packet size (vectorized) and
# one of 256K elements (split over the intra-op thread pool).
SHAPES = [(), (7,), (1001,), (32, 33), (256, 1024)]


def _values(rng, shape, kind):
    """float32 values: "finite" (several scales, subnormals, +-0) or "nonfinite"."""
    n = int(np.prod(shape, dtype=np.int64))
    out = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)).astype(np.float32)
    pick = rng.random(n)
    special = ([1e-39, -1e-40, 1.1754942e-38, 0.0, -0.0] if kind == "finite" else
               [np.nan, -np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0, -0.0])
    out[pick < 0.3] = rng.choice(np.array(special, np.float32), n)[pick < 0.3]
    return out.reshape(shape)


def _pair(values):
    """The same initial value in a tf_bf16 variable and a TensorFlow-op variable."""
    return tf.Variable(values), tf.Variable(values)


def _gradient(rng, shape, kind, gdtype):
    """(gradient for tf_bf16, the same values in float32 for TensorFlow's op)."""
    g = tf.cast(tf.constant(_values(rng, shape, kind)), gdtype)
    return g, tf.cast(g, tf.float32)


def _f32(x):
    return tf.constant(x, tf.float32)


CANONICAL_NAN = 0x7FC00000


def assert_equal_but_nan_bits(got, want, what, written=None):
    """tf_bf16 result `got` equals TensorFlow's `want` except for the bits of NaNs.

    `written`: boolean mask of the elements the update wrote (default: all);
    elements it did not write keep whatever NaN they held.

    The tightest honest comparison for non-finite data: every non-NaN element
    bit for bit, NaN in exactly the same elements, and each of tf_bf16's NaNs
    the canonical quiet NaN 0x7FC00000. tf_bf16 canonicalizes every NaN result
    by specification (docs/rounding.md: IEEE 754 leaves the sign and payload of
    a NaN produced by arithmetic open, and implementations differ), while
    TensorFlow's kernels propagate an operand's NaN, whose sign and payload
    depend on which operand was NaN and on Eigen's operand order; e.g. plain
    SGD with grad = -NaN gives var = -NaN (0xffc00000) in
    ResourceApplyGradientDescent, 0x7fc00000 in tf_bf16.
    """
    got_bits, want_bits = bits(got).reshape(-1), bits(want).reshape(-1)
    got_nan = np.isnan(np.asarray(got.numpy() if hasattr(got, "numpy") else got)).reshape(-1)
    want_nan = np.isnan(np.asarray(want.numpy() if hasattr(want, "numpy") else want)).reshape(-1)
    nan_positions_differ = np.flatnonzero(got_nan != want_nan)
    assert nan_positions_differ.size == 0, (
        f"{what}: NaN in one result only at flat indices {nan_positions_differ[:10]}")
    value_differ = np.flatnonzero((got_bits != want_bits) & ~got_nan)
    assert value_differ.size == 0, (
        f"{what}: {value_differ.size} non-NaN elements differ; first at flat index "
        f"{value_differ[0]}: {got_bits[value_differ[0]]:#x} != {want_bits[value_differ[0]]:#x}")
    if written is None:
        written = np.ones_like(got_nan)
    odd_nans = np.flatnonzero(got_nan & written.reshape(-1) & (got_bits != CANONICAL_NAN))
    assert odd_nans.size == 0, (
        f"{what}: tf_bf16 NaN {got_bits[odd_nans[0]]:#x} is not the canonical NaN")


def _comparison(kind, written=None):
    """Bit for bit for finite data; see assert_equal_but_nan_bits for non-finite data."""
    if kind == "finite":
        return assert_bits_equal
    return lambda got, want, what: assert_equal_but_nan_bits(got, want, what, written)


# A learning rate that changes every step, as under a schedule: the Keras
# formulation (rate-scaled accumulator) and ResourceApplyMomentum's (gradient
# accumulator) are different algorithms then, not only different roundings.
def _learning_rate(step):
    return LR * (1.0 + 0.5 * step)


@pytest.mark.parametrize("kind", ["finite", "nonfinite"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_momentum_matches_resource_apply_keras_momentum(device, nesterov, gdtype, rounding,
                                                        kind):
    rng = np.random.default_rng(1)
    for shape in SHAPES:
        var, tf_var = _pair(_values(rng, shape, kind))
        accum, tf_accum = _pair(_values(rng, shape, kind))
        for step in range(STEPS):
            g, g32 = _gradient(rng, shape, kind, gdtype)
            lr = _learning_rate(step)
            ops.apply_sgd(var, g, lr, momentum=MOMENTUM, accumulator=accum,
                          nesterov=nesterov, rounding=rounding, step=step)
            tf.raw_ops.ResourceApplyKerasMomentum(
                var=tf_var.handle, accum=tf_accum.handle, lr=_f32(lr), grad=g32,
                momentum=_f32(MOMENTUM), use_nesterov=nesterov)
            what = f"shape={shape} step={step}"
            _comparison(kind)(accum, tf_accum, f"{what}, accum")
            _comparison(kind)(var, tf_var, f"{what}, var")


def test_momentum_is_not_resource_apply_momentum_under_a_schedule(device):
    """The formulation matters: with a changing learning rate, TensorFlow's
    other momentum op (gradient accumulator times the current rate) ends far
    from Keras's, by much more than rounding."""
    rng = np.random.default_rng(8)
    shape = (1001,)
    w0 = rng.standard_normal(shape).astype(np.float32)
    var, tf_var = _pair(w0)
    accum, tf_accum = _pair(np.zeros(shape, np.float32))
    for step in range(STEPS):
        g = tf.constant(rng.standard_normal(shape).astype(np.float32))
        ops.apply_sgd(var, g, _learning_rate(step), momentum=MOMENTUM, accumulator=accum)
        tf.raw_ops.ResourceApplyMomentum(var=tf_var.handle, accum=tf_accum.handle,
                                         lr=_f32(_learning_rate(step)), grad=g,
                                         momentum=_f32(MOMENTUM))
    moved = np.abs(var.numpy() - w0)
    assert np.median(np.abs(var.numpy() - tf_var.numpy()) / moved) > 0.05


@pytest.mark.parametrize("kind", ["finite", "nonfinite"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
def test_plain_sgd_matches_resource_apply_gradient_descent(device, gdtype, rounding, kind):
    rng = np.random.default_rng(2)
    for shape in SHAPES:
        var, tf_var = _pair(_values(rng, shape, kind))
        for step in range(STEPS):
            g, g32 = _gradient(rng, shape, kind, gdtype)
            ops.apply_sgd(var, g, LR, rounding=rounding, step=step)
            tf.raw_ops.ResourceApplyGradientDescent(var=tf_var.handle, alpha=_f32(LR),
                                                    delta=g32)
            _comparison(kind)(var, tf_var, f"shape={shape} step={step}, var")


def _beta_powers(step):
    """beta ** (step + 1) in float32 with tf.pow, as tf_bf16 (and Keras) compute them."""
    local_step = tf.cast(step + 1, tf.float32)
    return tf.pow(_f32(BETA_1), local_step), tf.pow(_f32(BETA_2), local_step)


def _second_moment(rng, shape, kind):
    v = _values(rng, shape, kind)
    return np.where(np.isnan(v), v, np.abs(v)).astype(np.float32)


@pytest.mark.parametrize("kind", ["finite", "nonfinite"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
def test_adam_matches_resource_apply_adam(device, gdtype, rounding, kind):
    rng = np.random.default_rng(3)
    for shape in SHAPES:
        var, tf_var = _pair(_values(rng, shape, kind))
        m, tf_m = _pair(_values(rng, shape, kind))
        v, tf_v = _pair(_second_moment(rng, shape, kind))
        for step in range(STEPS):
            g, g32 = _gradient(rng, shape, kind, gdtype)
            ops.apply_adam(var, g, m, v, LR, beta_1=_f32(BETA_1), beta_2=_f32(BETA_2),
                           epsilon=EPSILON, step=step, rounding=rounding)
            beta_1_power, beta_2_power = _beta_powers(step)
            tf.raw_ops.ResourceApplyAdam(
                var=tf_var.handle, m=tf_m.handle, v=tf_v.handle, beta1_power=beta_1_power,
                beta2_power=beta_2_power, lr=_f32(LR), beta1=_f32(BETA_1),
                beta2=_f32(BETA_2), epsilon=_f32(EPSILON), grad=g32, use_nesterov=False)
            what = f"shape={shape} step={step}"
            compare = _comparison(kind)
            compare(m, tf_m, f"{what}, m")
            compare(v, tf_v, f"{what}, v")
            compare(var, tf_var, f"{what}, var")


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
def test_amsgrad_matches_resource_apply_adam_with_amsgrad(device, gdtype, rounding):
    """Normal finite values only, because the two differ by design elsewhere:
    with v' = NaN, vhat = 0.5 TensorFlow's vhat.cwiseMax(v) keeps 0.5, while
    tf_bf16 propagates the NaN (docs/rounding.md 5.3); with v' = 0 and a
    subnormal vhat, TensorFlow's max (under denormals-are-zero) writes 0,
    while tf_bf16's selection keeps the subnormal's bits (the reference does
    the same; test_kernels_match_reference checks it)."""
    rng = np.random.default_rng(4)
    for shape in SHAPES:
        var, tf_var = _pair(rng.standard_normal(shape).astype(np.float32))
        m, tf_m = _pair(rng.standard_normal(shape).astype(np.float32) * 0.1)
        v, tf_v = _pair(np.abs(rng.standard_normal(shape)).astype(np.float32) * 0.01)
        vhat, tf_vhat = _pair(np.abs(rng.standard_normal(shape)).astype(np.float32) * 0.01)
        for step in range(STEPS):
            g32 = tf.constant(rng.standard_normal(shape).astype(np.float32))
            g = tf.cast(g32, gdtype)
            g32 = tf.cast(g, tf.float32)
            ops.apply_adam(var, g, m, v, LR, beta_1=_f32(BETA_1), beta_2=_f32(BETA_2),
                           epsilon=EPSILON, step=step, vhat=vhat, rounding=rounding)
            beta_1_power, beta_2_power = _beta_powers(step)
            tf.raw_ops.ResourceApplyAdamWithAmsgrad(
                var=tf_var.handle, m=tf_m.handle, v=tf_v.handle, vhat=tf_vhat.handle,
                beta1_power=beta_1_power, beta2_power=beta_2_power, lr=_f32(LR),
                beta1=_f32(BETA_1), beta2=_f32(BETA_2), epsilon=_f32(EPSILON), grad=g32)
            what = f"shape={shape} step={step}"
            for role, mine, theirs in (("m", m, tf_m), ("v", v, tf_v), ("vhat", vhat, tf_vhat),
                                       ("var", var, tf_var)):
                assert_bits_equal(mine, theirs, f"{what}, {role}")


# ---------------------------------------------------------------------------
# Sparse momentum, duplicate indices applied in order.

SPARSE_SHAPE = (40, 7)


def _sparse_step_inputs(rng, index_dtype, gdtype, kind="finite"):
    indices = rng.integers(0, SPARSE_SHAPE[0], 90)  # many duplicates
    indices[:4] = [5, 5, 5, 39]
    values = tf.cast(tf.constant(_values(rng, (90, SPARSE_SHAPE[1]), kind)), gdtype)
    return tf.constant(indices, index_dtype), values


@pytest.mark.parametrize("kind", ["finite", "nonfinite"])
@pytest.mark.parametrize("index_dtype", [tf.int32, tf.int64], ids=lambda d: d.name)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_sparse_momentum_matches_resource_sparse_apply_keras_momentum(
        device, nesterov, gdtype, rounding, index_dtype, kind):
    rng = np.random.default_rng(5)
    var, tf_var = _pair(_values(rng, SPARSE_SHAPE, kind))
    accum, tf_accum = _pair(_values(rng, SPARSE_SHAPE, kind))
    for step in range(STEPS):
        indices, values = _sparse_step_inputs(rng, index_dtype, gdtype, kind)
        lr = _learning_rate(step)
        ops.apply_sgd(var, tf.IndexedSlices(values, indices), lr, momentum=MOMENTUM,
                      accumulator=accum, nesterov=nesterov, rounding=rounding, step=step)
        tf.raw_ops.ResourceSparseApplyKerasMomentum(
            var=tf_var.handle, accum=tf_accum.handle, lr=_f32(lr),
            grad=tf.cast(values, tf.float32), indices=indices, momentum=_f32(MOMENTUM),
            use_nesterov=nesterov)
        written = np.zeros(SPARSE_SHAPE, bool)
        written[indices.numpy()] = True
        _comparison(kind, written)(accum, tf_accum, f"step={step}, accum")
        _comparison(kind, written)(var, tf_var, f"step={step}, var")
