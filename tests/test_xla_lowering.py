"""The XLA lowering (jit_compile=True) equals the CPU kernels and the reference BIT FOR BIT.

Every op runs twice on identical variables: through the CPU kernel (eagerly)
and inside ``tf.function(jit_compile=True)`` (XLA:CPU, the lowering of
cc/kernels/bf16_training_ops_xla.cc), for several steps in a row so that
rounded state feeds back; after each step every updated tensor is compared bit
for bit, and in the dense matrix also with tf_bf16.reference. The values are
those of test_kernels_match_reference (normal, huge, subnormal, +-0, NaNs of
every sign and payload, +-Inf), hyperparameters are run-time tensors (as
Keras passes its learning-rate variable) or compile-time constants, sparse
updates have int32 and int64 indices with duplicates.

XLA:CPU contracts multiply-adds into FMAs and TensorFlow's XLA:CPU runs with
denormals flushed, XLA:GPU keeps denormals and may drop f32->bf16->f32 round
trips: test_naive_multiply_add_is_contracted_under_xla shows the first is
real here, the HLO test checks the constructions that make the lowering
immune to all three, and a subprocess test runs the lowering with
XLA_FLAGS=--xla_allow_excess_precision=false and =true.

Adam's bias-correction powers are computed by the Python wrapper with
tf.pow, which XLA implements differently from TensorFlow's CPU kernel (see
test_xla_pow_differs_from_tensorflows); they are the op's inputs, not part of
the lowering, so the comparisons here give both sides TensorFlow's powers.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import test_kernels_match_reference as km
from tf_bf16 import ROUNDINGS
from conftest import DTYPES, assert_bits_equal, bits
from tf_bf16 import _args
from tf_bf16 import ops
from tf_bf16 import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

# Hyperparameters of every update (the values of test_kernels_match_reference).
HYPERPARAMETERS = dict(lr=km.LR, momentum=km.MOMENTUM, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                       lion_beta_1=0.9, lion_beta_2=0.99, weight_decay_scale=1.0)

MAX_STEP = 1024
_EAGER_POWERS = {}


def use_tensorflow_beta_powers(setattr_):
    """Makes the wrappers compute beta ** (step + 1) as TensorFlow's CPU
    kernel does, looked up by step, for the kernel, the reference and the XLA
    side alike. setattr_(module, name, value) installs it."""
    original = _args.bias_correction_powers

    def table(beta):
        key = float(np.float32(beta))
        if key not in _EAGER_POWERS:
            with tf.init_scope():
                _EAGER_POWERS[key] = tf.pow(tf.constant(key, tf.float32),
                                            tf.range(1, MAX_STEP + 1, dtype=tf.float32))
        return _EAGER_POWERS[key]

    def powers(beta_1, beta_2, step):
        if not all(isinstance(b, float) for b in (beta_1, beta_2)):
            return original(beta_1, beta_2, step)
        step = _args.int64_scalar(step, "step")
        return tf.gather(table(beta_1), step), tf.gather(table(beta_2), step)

    setattr_(_args, "bias_correction_powers", powers)


@pytest.fixture(autouse=True)
def tensorflow_beta_powers(monkeypatch):
    use_tensorflow_beta_powers(monkeypatch.setattr)


def _apply(module, variant, variables, gradient, rounding, step, hp):
    """One update of `variant`; hyperparameters from hp (floats or tensors)."""
    comp = variables.get("compensation")
    common = dict(rounding=rounding, compensation=comp, seed=km.SEED, var_id=km.VAR_ID)
    # A tensor when hp holds tensors: the weight-decay switch then happens at run time.
    weight_decay = variant.weight_decay * hp.get("weight_decay_scale", 1.0)
    if variant.op == "assign_add":
        return module.rounded_assign_add(variables["var"], gradient, step=step, **common)
    if variant.op == "sgd":
        return module.apply_sgd(variables["var"], gradient, hp["lr"],
                                momentum=hp["momentum"] if variant.momentum else 0.0,
                                accumulator=variables.get("accum"), nesterov=variant.nesterov,
                                weight_decay=weight_decay, step=step, **common)
    if variant.op == "lion":
        return module.apply_lion(variables["var"], gradient, variables["m"], hp["lr"],
                                 beta_1=hp["lion_beta_1"], beta_2=hp["lion_beta_2"],
                                 weight_decay=weight_decay, step=step, **common)
    return module.apply_adam(variables["var"], gradient, variables["m"], variables["v"],
                             hp["lr"], beta_1=hp["beta_1"], beta_2=hp["beta_2"],
                             epsilon=hp["epsilon"], step=step,
                             vhat=variables.get("vhat"), weight_decay=weight_decay,
                             **common)


def _run_time(hp):
    """Hyperparameters as run-time tensors, except Adam's betas: Keras passes
    Python floats, and the bias-correction powers are looked up by their value
    (tensorflow_beta_powers)."""
    return {k: v if k in ("beta_1", "beta_2") else tf.constant(v, tf.float32)
            for k, v in hp.items()}


def _xla_update(variant, variables, rounding, runtime_hyperparameters):
    """The update compiled with XLA: f(gradient, step, hyperparameters)."""

    @tf.function(jit_compile=True, reduce_retracing=True)
    def update(gradient, step, hp):
        if not runtime_hyperparameters:
            hp = HYPERPARAMETERS
        _apply(ops, variant, variables, gradient, rounding, step, hp)

    def run(gradient, step):
        update(gradient, tf.constant(step, tf.int64), _run_time(HYPERPARAMETERS))

    return run


def _run_dense(checker, rng, variant, shape, dtype, gdtype, rounding, kind,
               runtime_hyperparameters=True, with_reference=False, steps=STEPS):
    state = km._initial_state(rng, variant, shape, dtype, rounding, kind)
    kernel_vars, xla_vars = km._variables(state), km._variables(state)
    reference_vars = km._variables(state) if with_reference else None
    xla = _xla_update(variant, xla_vars, rounding, runtime_hyperparameters)
    for step in range(steps):
        gradient = km._tensor(km._values(rng, shape, kind), gdtype)
        _apply(ops, variant, kernel_vars, gradient, rounding, step, HYPERPARAMETERS)
        xla(gradient, step)
        what = f"{variant} shape={shape} kind={kind} step={step}"
        checker.compare_states(xla_vars, kernel_vars, f"XLA vs kernel: {what}")
        if with_reference:
            _apply(reference, variant, reference_vars, gradient, rounding, step, HYPERPARAMETERS)
            checker.compare_states(xla_vars, reference_vars, f"XLA vs reference: {what}")


ALL_DENSE_VARIANTS = km.DENSE_VARIANTS + km.LION_VARIANTS


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
@pytest.mark.parametrize("variant", ALL_DENSE_VARIANTS, ids=repr)
def test_dense_update_matches_kernel_and_reference(variant, dtype, gdtype, rounding):
    """1001 elements, each of every kind of value, run-time hyperparameters."""
    checker = km.BitChecker("XLA", "expected")
    rng = np.random.default_rng(1234)
    _run_dense(checker, rng, variant, (1001,), dtype, gdtype, rounding, "mixed",
               with_reference=True)
    checker.finish()


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("kind", km.KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
def test_each_kind_of_value_with_constant_hyperparameters(kind, dtype, rounding):
    """One kind in every tensor at once; hyperparameters are compile-time
    constants, which XLA folds into the element arithmetic."""
    checker = km.BitChecker("XLA", "expected")
    rng = np.random.default_rng(99)
    for variant, gdtype in ((km.MOMENTUM_WD, tf.float32), (km.AMSGRAD_WD, tf.bfloat16),
                            (km.LION_VARIANTS[1], tf.float32)):
        _run_dense(checker, rng, variant, (33,), dtype, gdtype, rounding, kind,
                   runtime_hyperparameters=False)
    checker.finish()


SHAPE_CASES = [((), "mixed"), ((0,), "normal"), ((0, 3), "normal"), ((1,), "nonfinite"),
               ((7,), "tiny"), ((4, 5, 6), "mixed"), ((2, 1, 9), "huge"), ((3, 2), "zeros")]


@pytest.mark.parametrize("dtype,gdtype,rounding", [
    (tf.bfloat16, tf.float32, "kahan"), (tf.bfloat16, tf.bfloat16, "stochastic"),
    (tf.float32, tf.bfloat16, "nearest")], ids=str)
@pytest.mark.parametrize("variant", [km.ASSIGN_ADD, km.NESTEROV_WD, km.AMSGRAD_WD,
                                     km.LION_VARIANTS[1]], ids=repr)
def test_shapes(variant, dtype, gdtype, rounding):
    """Scalars, empty tensors, several ranks."""
    checker = km.BitChecker("XLA", "expected")
    rng = np.random.default_rng(5)
    for shape, kind in SHAPE_CASES:
        _run_dense(checker, rng, variant, shape, dtype, gdtype, rounding, kind, steps=2)
    checker.finish()


@pytest.mark.parametrize("variant,dtype,rounding", [
    (km.NESTEROV_WD, tf.bfloat16, "kahan"),
    (km.AMSGRAD_WD, tf.bfloat16, "stochastic"),
    (km.AMSGRAD_WD, tf.float32, "nearest"),
], ids=str)
def test_large_variable(variant, dtype, rounding):
    checker = km.BitChecker("XLA", "expected")
    rng = np.random.default_rng(7)
    _run_dense(checker, rng, variant, km.LARGE_SHAPE, dtype, tf.float32, rounding, "mixed",
               steps=2)
    checker.finish()


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_ties(rounding):
    """Exact ties: w in [1, 2) (bf16 spacing 2^-7) plus 2^-8 or 3 * 2^-8 (plain
    SGD with lr = 2^-8, g = -1 or -3) lies halfway between two bf16 values.
    XLA equals the kernel, and nearest rounding goes to the even neighbour."""
    k = np.arange(256)
    w0 = (1.0 + (k % 128) * 2.0**-7) * np.where(k < 128, 1.0, -1.0)
    g = np.where(k % 2 == 0, -1.0, -3.0) * np.where(k < 128, 1.0, -1.0)
    state = {"var": km._tensor(w0.astype(np.float32), tf.bfloat16)}
    if rounding == "kahan":
        state["compensation"] = tf.zeros([256], tf.bfloat16)
    kernel_vars, xla_vars = km._variables(state), km._variables(state)
    sgd = km.DENSE_VARIANTS[1]
    hp = dict(HYPERPARAMETERS, lr=2.0**-8)
    gradient = tf.constant(g.astype(np.float32))
    _apply(ops, sgd, kernel_vars, gradient, rounding, 0, hp)

    @tf.function(jit_compile=True)
    def update(gradient, lr):
        _apply(ops, sgd, xla_vars, gradient, rounding, 0, dict(HYPERPARAMETERS, lr=lr))

    update(gradient, tf.constant(2.0**-8))
    checker = km.BitChecker("XLA", "kernel")
    checker.compare_states(xla_vars, kernel_vars, f"ties, {rounding}")
    checker.finish()
    if rounding == "nearest":
        exact = w0 - g * 2.0**-8                      # halfway between two bf16 values
        got = kernel_vars["var"].numpy().astype(np.float64)
        assert np.all(np.abs(got - exact) == 2.0**-8)     # half a bf16 spacing away
        assert np.all(bits(kernel_vars["var"]) % 2 == 0)   # the even neighbour


# ---------------------------------------------------------------------------
# Sparse updates.

# (variable shape, index lists of one length, one per step; kind of values;
# index dtype): duplicates in every order, a row repeated nine times (nine
# rounds). One length per case, so that XLA compiles each case once.
SPARSE_CASES = [
    ((10, 3), [[3, 0, 3, 9, 3, 5], [9, 9, 1, 4, 9, 0], [2, 2, 2, 2, 2, 2]], "mixed", tf.int32),
    ((11,), [[10, 0, 5, 2], [7, 7, 1, 7]], "mixed", tf.int64),
    ((6, 2, 3), [[5, 1, 1, 0, 3, 4, 4, 4, 4, 4, 4], [2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 1]],
     "nonfinite", tf.int64),
]


def _xla_sparse_update(variant, variables, rounding):
    @tf.function(jit_compile=True)
    def update(values, indices, dense_shape, step, hp):
        gradient = tf.IndexedSlices(values, indices, dense_shape)
        _apply(ops, variant, variables, gradient, rounding, step, hp)

    return update


def _run_sparse(checker, rng, variant, shape, index_lists, kind, index_dtype, dtype, gdtype,
                rounding):
    state = km._initial_state(rng, variant, shape, dtype, rounding, kind)
    kernel_vars, xla_vars = km._variables(state), km._variables(state)
    xla = _xla_sparse_update(variant, xla_vars, rounding)
    hp = _run_time(HYPERPARAMETERS)
    for step, index_list in enumerate(index_lists):
        indices = tf.constant(index_list, index_dtype, shape=[len(index_list)])
        values = km._tensor(km._values(rng, (len(index_list),) + shape[1:], kind), gdtype)
        dense_shape = tf.constant(shape, tf.int64)
        _apply(ops, variant, kernel_vars, tf.IndexedSlices(values, indices, dense_shape),
               rounding, step, HYPERPARAMETERS)
        xla(values, indices, dense_shape, tf.constant(step, tf.int64), hp)
        checker.compare_states(xla_vars, kernel_vars,
                               f"{variant} shape={shape} indices={index_list} "
                               f"({index_dtype.name}) kind={kind} step={step}")


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype,gdtype", [(tf.bfloat16, tf.float32), (tf.float32, tf.bfloat16)],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("variant", km.SPARSE_VARIANTS, ids=repr)
def test_sparse_update_matches_kernel(variant, dtype, gdtype, rounding):
    """Duplicates applied in order; int32 and int64 indices. (Gradient dtypes
    are covered by the dense matrix: sparse updates load them the same way.)"""
    checker = km.BitChecker("XLA", "expected")
    rng = np.random.default_rng(4321)
    for shape, index_lists, kind, index_dtype in SPARSE_CASES:
        _run_sparse(checker, rng, variant, shape, index_lists, kind, index_dtype, dtype, gdtype,
                    rounding)
    checker.finish()


def test_sparse_update_without_rows_or_indices():
    checker = km.BitChecker("XLA", "expected")
    rng = np.random.default_rng(3)
    for shape in ((0, 3), (4, 3)):   # no rows; no indices
        _run_sparse(checker, rng, km.AMSGRAD_WD, shape, [[], []], "normal", tf.int32,
                    tf.bfloat16, tf.float32, "kahan")
    checker.finish()


# ---------------------------------------------------------------------------
# stochastic_round


@pytest.mark.parametrize("seed,step,var_id", km.STREAMS)
def test_stochastic_round_matches_kernel(seed, step, var_id):
    rng = np.random.default_rng(seed & 0xFFFF)
    xla_round = tf.function(ops.stochastic_round, jit_compile=True, reduce_retracing=True)
    for shape, kind in km.DENSE_CASES + [((5, 7), "nonfinite"), (km.LARGE_SHAPE, "mixed")]:
        x = tf.constant(km._values(rng, shape, kind))
        args = (tf.constant(seed, tf.int64), tf.constant(step, tf.int64),
                tf.constant(var_id, tf.int64))
        got = xla_round(x, *args)
        assert got.dtype == tf.bfloat16 and got.shape == x.shape
        assert_bits_equal(got, ops.stochastic_round(x, seed, step, var_id),
                          f"stochastic_round shape={shape} kind={kind}")
        if x.shape.num_elements() < 10000:
            assert_bits_equal(got, reference.stochastic_round(x, seed, step, var_id),
                              f"vs reference: shape={shape} kind={kind}")


# ---------------------------------------------------------------------------
# Validation: compile-time errors, and run-time values that leave every
# variable untouched (docs/rounding.md 8.4).


def _fresh(variant, dtype=tf.bfloat16, rounding="kahan", shape=(5, 3)):
    rng = np.random.default_rng(11)
    return km._variables(km._initial_state(rng, variant, shape, dtype, rounding, "normal"))


def _snapshot(variables):
    return {role: v.numpy().copy() for role, v in variables.items()}


def _assert_untouched(variables, before, what):
    for role, v in variables.items():
        assert_bits_equal(v, before[role], f"{what}: {role} was written")


def _assert_moved(variables, before, what):
    assert not np.array_equal(bits(variables["var"]), bits(before["var"])), what


@pytest.mark.parametrize("name,value,variant,message", [
    ("lr", float("nan"), km.NESTEROV_WD, "Input 'lr' must be a finite, non-negative number"),
    ("lr", -1.0, km.AMSGRAD_WD, "Input 'lr' must be a finite, non-negative number"),
    ("momentum", float("inf"), km.NESTEROV_WD, "Input 'momentum' must be a finite number"),
    ("epsilon", -1e-7, km.AMSGRAD_WD, "Input 'epsilon' must be a finite, non-negative"),
    ("lr", float("nan"), km.LION_VARIANTS[1], "Input 'lr' must be a finite, non-negative"),
    ("lion_beta_1", 1.5, km.LION_VARIANTS[1], "Inputs 'beta1' and 'beta2' must be in [0, 1]"),
    ("beta_1", 1.0, km.AMSGRAD_WD, "Inputs 'one_minus_beta1' and 'one_minus_beta2' must be in (0, 1]"),
    ("beta_2", -0.5, km.AMSGRAD_WD, "Inputs 'one_minus_beta1' and 'one_minus_beta2' must be in (0, 1]"),
    ("weight_decay_scale", float("nan"), km.NESTEROV_WD,
     "Input 'weight_decay' must be a finite number"),
], ids=lambda p: p if isinstance(p, str) else None)
def test_constant_bad_hyperparameter_fails_to_compile(name, value, variant, message):
    """A bad value known at compile time is an error then, with the kernel's message."""
    variables = _fresh(variant)
    before = _snapshot(variables)
    hp = dict(HYPERPARAMETERS, **{name: value})

    @tf.function(jit_compile=True)
    def update(gradient):
        _apply(ops, variant, variables, gradient, "kahan", 0, hp)

    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
        update(tf.ones((5, 3)))
    _assert_untouched(variables, before, f"{name}={value}")


@pytest.mark.parametrize("name,value,variant", [
    ("lr", float("nan"), km.NESTEROV_WD),
    ("lr", -0.5, km.NESTEROV_WD),
    ("lr", float("inf"), km.DENSE_VARIANTS[1]),
    ("momentum", float("nan"), km.NESTEROV_WD),
    ("lr", float("nan"), km.AMSGRAD_WD),
    ("epsilon", -1.0, km.AMSGRAD_WD),
    ("beta_1", 1.0, km.AMSGRAD_WD),
    ("beta_2", 1.5, km.AMSGRAD_WD),
    ("beta_1", -0.1, km.AMSGRAD_WD),
    ("lr", float("-inf"), km.LION_VARIANTS[1]),
    ("lion_beta_2", 1.0000001, km.LION_VARIANTS[1]),
    ("lion_beta_1", -0.0000001, km.LION_VARIANTS[1]),
    ("weight_decay_scale", float("nan"), km.NESTEROV_WD),
], ids=lambda p: p if isinstance(p, str) else None)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_run_time_bad_hyperparameter_leaves_variables_untouched(name, value, variant, sparse):
    """A bad value known only at run time cannot raise inside compiled code:
    the update writes every variable back unchanged, and the next good call
    updates normally (the compiled code is the same). Sparse Lion: apply_lion
    densifies the IndexedSlices (Lion moves every row) inside the compiled step."""
    variables = _fresh(variant)
    values = {k: tf.Variable(v, dtype=tf.float32) for k, v in HYPERPARAMETERS.items()}

    @tf.function(jit_compile=True)
    def update(gradient):
        if variant.op == "adam":   # betas as run-time values: the raw op's inputs
            _raw_adam(variables, gradient, values)
        else:
            _apply(ops, variant, variables, gradient, "kahan", 0, values)

    gradient = tf.ones((5, 3)) * 0.25
    if sparse:
        gradient = tf.IndexedSlices(tf.ones((2, 3)) * 0.25, tf.constant([4, 1]),
                                    tf.constant([5, 3]))
    before = _snapshot(variables)
    values[name].assign(value)
    update(gradient)
    _assert_untouched(variables, before, f"{name}={value}")
    values[name].assign(HYPERPARAMETERS.get(name, 0.9 if name == "beta_1" else 0.999))
    update(gradient)
    _assert_moved(variables, before, f"{name} restored")


def _raw_adam(variables, gradient, values):
    """apply_adam with the betas and their powers as run-time tensors."""
    b1, b2 = values["beta_1"], values["beta_2"]
    lib = ops._lib()
    common = dict(
        var=variables["var"].handle, m=variables["m"].handle, v=variables["v"].handle,
        vhat=[variables["vhat"].handle], compensation=[variables["compensation"].handle],
        beta1_power=b1 * b1, beta2_power=b2 * b2, lr=values["lr"], one_minus_beta1=1.0 - b1,
        one_minus_beta2=1.0 - b2,
        epsilon=values["epsilon"], weight_decay=tf.constant(km.WEIGHT_DECAY),
        seed=tf.constant(1, tf.int64), step=tf.constant(1, tf.int64),
        var_id=tf.constant(0, tf.int64), T=tf.bfloat16, rounding="kahan")
    if isinstance(gradient, tf.IndexedSlices):
        return lib.tf_bf16_resource_sparse_apply_adam(grad=gradient.values,
                                                      indices=gradient.indices, **common)
    return lib.tf_bf16_resource_apply_adam(grad=gradient, **common)


def test_constant_beta1_power_of_one_fails_to_compile():
    variables = _fresh(km.AMSGRAD_WD)
    lib = ops._lib()

    @tf.function(jit_compile=True)
    def update():
        lib.tf_bf16_resource_apply_adam(
            var=variables["var"].handle, m=variables["m"].handle, v=variables["v"].handle,
            vhat=[variables["vhat"].handle], compensation=[variables["compensation"].handle],
            beta1_power=tf.constant(1.0), beta2_power=tf.constant(0.998), lr=tf.constant(0.01),
            one_minus_beta1=tf.constant(1 - 0.9), one_minus_beta2=tf.constant(1 - 0.999),
            epsilon=tf.constant(1e-7),
            weight_decay=tf.constant(0.0), grad=tf.ones((5, 3)), seed=tf.constant(1, tf.int64),
            step=tf.constant(1, tf.int64), var_id=tf.constant(0, tf.int64), T=tf.bfloat16,
            rounding="kahan")

    before = _snapshot(variables)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Input 'beta1_power' is 1"):
        update()
    _assert_untouched(variables, before, "beta1_power=1")


def test_run_time_beta1_power_of_one_leaves_variables_untouched():
    variables = _fresh(km.AMSGRAD_WD)
    power = tf.Variable(1.0)
    lib = ops._lib()

    @tf.function(jit_compile=True)
    def update():
        lib.tf_bf16_resource_apply_adam(
            var=variables["var"].handle, m=variables["m"].handle, v=variables["v"].handle,
            vhat=[variables["vhat"].handle], compensation=[variables["compensation"].handle],
            beta1_power=power, beta2_power=tf.constant(0.998), lr=tf.constant(0.01),
            one_minus_beta1=tf.constant(1 - 0.9), one_minus_beta2=tf.constant(1 - 0.999),
            epsilon=tf.constant(1e-7),
            weight_decay=tf.constant(0.0), grad=tf.ones((5, 3)), seed=tf.constant(1, tf.int64),
            step=tf.constant(1, tf.int64), var_id=tf.constant(0, tf.int64), T=tf.bfloat16, rounding="kahan")

    before = _snapshot(variables)
    update()
    _assert_untouched(variables, before, "beta1_power=1")
    power.assign(0.81)
    update()
    _assert_moved(variables, before, "beta1_power restored")


@pytest.mark.parametrize("bad", [[5, 1], [-1, 2], [2, 7, 2]], ids=str)
@pytest.mark.parametrize("variant", [km.SPARSE_VARIANTS[1], km.AMSGRAD_WD], ids=repr)
def test_run_time_index_out_of_range_leaves_variables_untouched(variant, bad):
    """Indices are run-time values: one out of [0, rows) makes the whole update
    a no-op (the CPU kernel raises before writing anything)."""
    variables = _fresh(variant)
    update = _xla_sparse_update(variant, variables, "kahan")
    hp = _run_time(HYPERPARAMETERS)
    before = _snapshot(variables)
    values = tf.ones((len(bad), 3))
    update(values, tf.constant(bad, tf.int64), tf.constant([5, 3], tf.int64),
           tf.constant(0, tf.int64), hp)
    _assert_untouched(variables, before, f"indices {bad}")
    update(values, tf.constant([4, 0, 4][:len(bad)], tf.int64), tf.constant([5, 3], tf.int64),
           tf.constant(0, tf.int64), hp)
    _assert_moved(variables, before, "valid indices")


def test_structural_errors_fail_to_compile_with_the_kernels_messages():
    lib = ops._lib()
    var = tf.Variable(tf.zeros((4,), tf.bfloat16))
    accum = tf.Variable(tf.zeros((4,), tf.float32))       # wrong dtype for a bf16 var
    comp = tf.Variable(tf.zeros((4,), tf.bfloat16))
    common = dict(lr=tf.constant(0.1), grad=tf.ones((4,)), momentum=tf.constant(0.9),
                  weight_decay=tf.constant(0.0), seed=tf.constant(0, tf.int64),
                  step=tf.constant(0, tf.int64), var_id=tf.constant(0, tf.int64))
    cases = [
        (dict(accum=[accum.handle], compensation=[comp.handle], rounding="kahan"),
         "input 'accum' has dtype float but bfloat16 was expected"),
        (dict(accum=[], compensation=[], rounding="kahan"),
         "rounding='kahan' on a bfloat16 variable needs exactly one compensation"),
        (dict(accum=[], compensation=[comp.handle], rounding="nearest"),
         "A compensation variable is only used with rounding='kahan'"),
        (dict(accum=[], compensation=[], rounding="nearest", use_nesterov=True),
         "use_nesterov=True needs a momentum accumulator"),
    ]
    for kwargs, message in cases:
        @tf.function(jit_compile=True)
        def update():
            lib.tf_bf16_resource_apply_sgd(var=var.handle, T=tf.bfloat16, **kwargs, **common)

        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            update()
    assert_bits_equal(var, tf.zeros((4,), tf.bfloat16), "var untouched")


# ---------------------------------------------------------------------------
# Why the lowering is built as it is (docs/rounding.md 8.3).


def test_naive_multiply_add_is_contracted_under_xla():
    """XLA:CPU fuses a * b + c into one FMA (its LLVM target options always
    allow it): (1 + 2^-12)^2 - (1 + 2^-11) is 2^-24 with one rounding, 0 with
    two. A lowering written with plain multiplies and adds would differ from
    the kernels, which round after every operation (-ffp-contract=off)."""
    a = tf.constant([1.0 + 2.0**-12])
    c = tf.constant([-(1.0 + 2.0**-11)])

    def multiply_add(a, c):
        return a * a + c

    assert multiply_add(a, c).numpy()[0] == 0.0
    assert tf.function(multiply_add, jit_compile=True)(a, c).numpy()[0] == 2.0**-24


def _hlo(variant, dtype, rounding):
    variables = _fresh(variant, dtype, rounding, shape=(8,))

    @tf.function(jit_compile=True)
    def update(gradient, lr):
        _apply(ops, variant, variables, gradient, rounding, 0, dict(HYPERPARAMETERS, lr=lr))

    return update.experimental_get_compiler_ir(tf.ones((8,)), tf.constant(0.1))(stage="hlo")


@pytest.mark.parametrize("variant", [km.NESTEROV_WD, km.AMSGRAD_WD, km.LION_VARIANTS[1],
                                     km.ASSIGN_ADD], ids=repr)
def test_hlo_has_no_float_rounding_and_no_contractible_multiply(variant):
    """In the lowering's HLO (before XLA's passes): no convert between float
    types other than f32 <-> f64 (division and square root), so no f32->bf16->f32
    round trip for XLA to remove, and every float32 multiply is used only by a
    bitcast-convert (the denormal flush), never directly by an add."""
    hlo = _hlo(variant, tf.bfloat16, "kahan")
    lines = [line.strip() for line in hlo.splitlines() if " = " in line]
    defs = {}
    for line in lines:
        name, rest = line.split(" = ", 1)
        defs[name.replace("ROOT ", "").strip()] = rest
    for name, rest in defs.items():
        m = re.match(r"(\w+)\[[^\]]*\]\S* convert\((.*)\)", rest)
        if m and m.group(1) in ("bf16", "f16", "f32", "f64"):
            operand = m.group(2).strip()
            if operand.startswith("%"):
                operand = defs.get(operand.split(",")[0], "")
            src = operand.split("[", 1)[0]
            assert {m.group(1), src} <= {"f32", "f64"}, f"float convert {src}->{m.group(1)}: {rest}"
    multiplies = [n for n, rest in defs.items() if re.match(r"f32\[[^\]]*\]\S* multiply\(", rest)]
    assert multiplies or variant.op == "assign_add", "no float32 multiply in the HLO"
    for n in multiplies:
        users = [rest for rest in defs.values() if re.search(rf"[(, ]{re.escape(n)}[,)]", rest)]
        assert users and all(re.match(r"u32\[[^\]]*\]\S* bitcast-convert\(", u) for u in users), (
            f"{n} is used by {users}")


def test_xla_pow_differs_from_tensorflows():
    """Why the tests above give both sides TensorFlow's beta powers: tf.pow
    under XLA is XLA's pow, which differs from TensorFlow's CPU kernel in the
    last bit for some steps (here 0.999 ** 4). Keras's own Adam has the same
    property; the op takes the powers as inputs and uses them exactly."""
    steps = tf.range(1.0, 9.0)
    beta = tf.constant(0.999)
    eager = tf.pow(beta, steps)
    xla = tf.function(tf.pow, jit_compile=True)(beta, steps)
    assert not np.array_equal(bits(eager), bits(xla))


# ---------------------------------------------------------------------------
# XLA_FLAGS=--xla_allow_excess_precision both ways (subprocesses: XLA reads its
# flags once per process).

_FLAG_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
sys.path.insert(0, {tests!r})
import test_xla_lowering as t
t.use_tensorflow_beta_powers(setattr)
out = {{}}
for name, variant, dtype, gdtype, rounding in t.FLAG_CASES:
    rng = np.random.default_rng(2024)
    state = t.km._initial_state(rng, variant, (257,), dtype, rounding, "mixed")
    variables = t.km._variables(state)
    xla = t._xla_update(variant, variables, rounding, True)
    for step in range(t.STEPS):
        xla(t.km._tensor(t.km._values(rng, (257,), "mixed"), gdtype), step)
    out[name] = {{role: t.bits(v).tolist() for role, v in variables.items()}}
print("RESULT " + json.dumps(out))
"""

FLAG_CASES = [
    ("nesterov_wd_kahan", km.NESTEROV_WD, tf.bfloat16, tf.float32, "kahan"),
    ("amsgrad_wd_kahan", km.AMSGRAD_WD, tf.bfloat16, tf.bfloat16, "kahan"),
    ("amsgrad_wd_stochastic", km.AMSGRAD_WD, tf.bfloat16, tf.float32, "stochastic"),
    ("lion_wd_kahan", km.LION_VARIANTS[1], tf.bfloat16, tf.float32, "kahan"),
    ("assign_add_kahan", km.ASSIGN_ADD, tf.bfloat16, tf.float32, "kahan"),
    ("adamw_float32", km.DENSE_VARIANTS[8], tf.float32, tf.float32, "nearest"),
]


@pytest.mark.parametrize("allow", ["false", "true"])
def test_excess_precision_flag_changes_no_bit(allow):
    env = dict(os.environ, XLA_FLAGS=f"--xla_allow_excess_precision={allow}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = _FLAG_SCRIPT.format(tests=os.path.join(ROOT, "tests"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    got = json.loads(line[len("RESULT "):])
    for name, variant, dtype, gdtype, rounding in FLAG_CASES:
        rng = np.random.default_rng(2024)
        state = km._initial_state(rng, variant, (257,), dtype, rounding, "mixed")
        variables = km._variables(state)
        for step in range(STEPS):
            gradient = km._tensor(km._values(rng, (257,), "mixed"), gdtype)
            _apply(ops, variant, variables, gradient, rounding, step, HYPERPARAMETERS)
        for role, v in variables.items():
            assert got[name][role] == bits(v).tolist(), (
                f"XLA_FLAGS=--xla_allow_excess_precision={allow}: {name}, {role} differs "
                "from the kernel")


def test_library_loaded_before_tensorflow_creates_its_devices():
    """The other registration path (cc/kernels/bf16_training_ops_xla.cc): the
    tests above load the op library after TensorFlow registered its JIT
    kernels, here it is loaded first."""
    script = (
        "import tensorflow as tf\n"
        "from tf_bf16 import _loader, ops\n"
        "_loader.load()\n"
        "v = tf.Variable(tf.zeros([4], tf.bfloat16))\n"
        "@tf.function(jit_compile=True)\n"
        "def f():\n"
        "    ops.rounded_assign_add(v, tf.fill([4], 0.3), rounding='nearest')\n"
        "f()\n"
        "print('RESULT', v.numpy().astype('float32').tolist())\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT [0.30078125, 0.30078125, 0.30078125, 0.30078125]" in proc.stdout


def test_exported_train_steps_run_bit_identical_under_jax(tmp_path):
    """tools/xla_hlo_export.py + tools/xla_hlo_run_jax.py on JAX's CPU backend:
    the HLO of every exported train step, compiled by JAX's XLA client, gives
    the CPU kernels' bits; and the control shows this backend contracts plain
    multiply-adds (so the float32 multiply-add cases would have caught it)."""
    import importlib.util
    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed (tools/xla_hlo_run_jax.py needs it; no TensorFlow)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = str(tmp_path / "xla_hlo")
    export = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "xla_hlo_export.py"),
                             "--out", out, "--elements", "4099"],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "xla_hlo_run_jax.py"),
                          out, "--backend", "cpu"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert "SUMMARY: 10 of 10 tf_bf16 cases bit-identical" in run.stdout, run.stdout
    assert "multiply-adds ARE contracted" in run.stdout, run.stdout
