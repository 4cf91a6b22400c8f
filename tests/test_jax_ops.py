"""tf_bf16.jax_ops (the specification in jax.numpy) equals the TensorFlow side BIT FOR BIT.

Two levels, in this (TensorFlow) process, with JAX on the CPU:

- the specification's functions (Mix32, stream keys, per-element bits, the
  three roundings, NaN canonicalization, the Kahan step) against
  tf_bf16.reference on special values: subnormals, +-0, +-Inf, NaNs of both
  signs with payloads (quiet and signalling), exact ties to even and odd,
  the largest finite values and the carry into Inf, the smallest normals;
- every update (`rounded_assign_add`, SGD with momentum / Nesterov / weight
  decay, Adam / AMSGrad / AdamW, Lion) compiled with `jax.jit`, against the
  C++ CPU kernels (tf_bf16.ops), several steps in a row on the value kinds of
  tests/test_kernels_match_reference.py, with hyperparameters traced (as in a
  Keras train step) and constant.

The Keras level (optimizers, policy, fit, saving) on the JAX backend runs in
subprocesses: tests/test_jax_backend.py.
"""

import functools
import zlib

import numpy as np
import pytest
import tensorflow as tf

import jax
import jax.numpy as jnp  # noqa: E402

from conftest import DTYPES, bits  # noqa: E402
from test_kernels_match_reference import (  # noqa: E402
    DENSE_CASES, DENSE_VARIANTS, LR, MOMENTUM, NONFINITE_BITS, SEED, TINY, VAR_ID, BitChecker,
    Variant, _initial_state, _tensor, _values)
from tf_bf16 import ROUNDINGS  # noqa: E402
from tf_bf16 import jax_ops  # noqa: E402
from tf_bf16 import ops  # noqa: E402
from tf_bf16 import reference  # noqa: E402


def to_jax(x):
    """A jax array with exactly the bits of a TF tensor/variable."""
    x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    return jnp.asarray(x)


def assert_same_bits(got, want, what):
    got_bits, want_bits = bits(np.asarray(got)).reshape(-1), bits(want).reshape(-1)
    assert got_bits.shape == want_bits.shape, f"{what}: shapes differ"
    differ = np.flatnonzero(got_bits != want_bits)
    assert differ.size == 0, (
        f"{what}: {differ.size} of {got_bits.size} differ; first at {differ[0]}: jax "
        f"{got_bits[differ[0]]:#x} != tf {want_bits[differ[0]]:#x}")


# ---------------------------------------------------------------------------
# The specification's functions against tf_bf16.reference


def special_float32():
    """float32 values where the rounding has edge cases (bit patterns)."""
    patterns = [
        0x00000000, 0x80000000,                       # +-0
        0x00000001, 0x80000001, 0x007FFFFF, 0x00008000, 0x00018000, 0x0000FFFF,  # subnormals
        0x00800000, 0x80800000, 0x00807FFF, 0x00808000, 0x00818000,  # smallest normals, ties
        0x3F800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # 1.0, ties even/odd
        0xBF808000, 0xBF818000,                       # negative ties
        0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,  # largest bf16, carry to Inf
        0xFF7F8000, 0xFF7FFFFF,
        0x7F800000, 0xFF800000,                       # +-Inf
    ] + [int(b) for b in NONFINITE_BITS]
    rng = np.random.default_rng(3)
    random = rng.integers(0, 2**32, 2000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([np.array(patterns, np.uint32), random]).view(np.float32)


def test_mix32_matches_reference():
    x = np.concatenate([np.arange(100, dtype=np.uint32),
                        np.array([2**31, 2**32 - 1, 0x6A09E667], np.uint32),
                        np.random.default_rng(1).integers(0, 2**32, 1000,
                                                          dtype=np.uint64).astype(np.uint32)])
    assert_same_bits(jax_ops.mix32(x), reference.mix32(tf.constant(x)), "mix32")


STREAM_WORDS = [(0, 0, 0), (17, 3, 1), (-1, 2**31, -5), (2**33 + 7, 2**40 + 1, 2**62 + 99),
                (2**63 - 1, -2**63, 12345), (-2**31, 2**32 - 1, 2**32)]


@pytest.mark.parametrize("seed,step,var_id", STREAM_WORDS)
def test_stream_key_matches_reference_python_and_traced(seed, step, var_id):
    want = reference.stream_key(tf.constant(seed, tf.int64), tf.constant(step, tf.int64),
                                tf.constant(var_id, tf.int64)).numpy()
    assert int(jax_ops.stream_key(seed, step, var_id)) == int(want)
    if -2**31 <= step < 2**31:   # a traced int32 step, as the Keras JAX backend's counter
        traced = jax.jit(lambda s: jax_ops.stream_key(seed, s, var_id))(jnp.int32(step))
        assert int(traced) == int(want)


@pytest.mark.parametrize("shape", [(), (1,), (1000,), (13, 7), (3, 4, 5)])
def test_draws_use_the_flat_row_major_index(shape):
    key = reference.stream_key(tf.constant(5, tf.int64), tf.constant(9, tf.int64),
                               tf.constant(2, tf.int64))
    n = int(np.prod(shape))
    want = [d.numpy().reshape(shape)
            for d in reference.draws(key, tf.range(n, dtype=tf.int64))]
    python_key = int(key.numpy())
    for count in (1, 2, 3, 4):
        got = jax_ops.draws(jax_ops.element_hash(python_key, shape), count)
        traced = jax.jit(lambda k, c=count: jax_ops.draws(jax_ops.element_hash(k, shape), c))(
            jnp.uint32(python_key))
        assert len(got) == len(traced) == count
        for k in range(count):
            assert_same_bits(got[k], want[k], f"d{k} (python key)")
            assert_same_bits(traced[k], want[k], f"d{k} (traced key)")


def test_round_nearest_and_canonical_nan_match_reference():
    x = special_float32()
    assert_same_bits(jax.jit(jax_ops.round_nearest)(x), reference.round_nearest(x),
                     "round_nearest")
    assert_same_bits(jax.jit(jax_ops.canonicalize_nan)(x), reference.canonicalize_nan(x),
                     "canonicalize_nan")
    # RNE is the same function as TensorFlow's cast, NaN aside.
    finite = x[np.isfinite(x)]
    assert_same_bits(jax_ops.round_nearest(finite), tf.cast(finite, tf.bfloat16), "tf.cast")


@pytest.mark.parametrize("random16", [0, 1, 0x7FFF, 0x8000, 0xFFFF, "random"])
def test_round_stochastic_matches_reference(random16):
    x = special_float32()
    r = (np.random.default_rng(4).integers(0, 2**16, x.size).astype(np.uint32)
         if random16 == "random" else np.full(x.size, random16, np.uint32))
    assert_same_bits(jax.jit(jax_ops.round_stochastic)(x, r),
                     reference.round_stochastic(x, tf.constant(r)), "round_stochastic")


def test_stochastic_round_matches_kernel():
    x = special_float32()[:2000].reshape(40, 50)
    want = ops.stochastic_round(x, SEED, 11, VAR_ID)
    assert_same_bits(jax_ops.stochastic_round(x, SEED, 11, VAR_ID), want, "eager")
    got = jax.jit(lambda x, s: jax_ops.stochastic_round(x, SEED, s, VAR_ID))(x, jnp.int32(11))
    assert_same_bits(got, want, "jit, traced step")


def test_kahan_step_matches_reference():
    rng = np.random.default_rng(5)
    n = 4000
    weight = np.concatenate([_values(rng, (n,), k) for k in ("normal", "tiny", "huge",
                                                               "zeros", "nonfinite")])
    weight = tf.cast(_tensor(weight, tf.bfloat16), tf.float32).numpy()   # bf16-valued
    delta = np.concatenate([_values(rng, (n,), k) for k in ("normal", "tiny", "huge",
                                                              "zeros", "nonfinite")])
    delta[:n] *= np.float32(1e-3)
    comp = np.concatenate([_values(rng, (n,), k) for k in ("normal", "tiny", "huge", "zeros",
                                                           "nonfinite")])
    comp[:n] *= np.float32(1e-3)
    comp = _tensor(comp, tf.bfloat16)
    comp = tf.cast(comp, tf.float32)
    want_w, want_c = reference.kahan_add(tf.constant(weight), tf.constant(delta), comp)
    got_w, got_c = jax.jit(jax_ops.kahan_add)(weight, delta, to_jax(comp))
    assert_same_bits(got_w, want_w, "kahan weight")
    assert_same_bits(got_c, want_c, "kahan compensation")


def test_flush_denormal_is_what_tensorflow_arithmetic_does():
    x = np.concatenate([TINY, -TINY, special_float32()[:40]])
    one = np.float32(1)
    want = (tf.constant(x) * tf.constant(one)).numpy()     # a TF CPU op: FTZ/DAZ
    got = jax_ops.flush_denormal(x)
    finite = np.isfinite(x)
    assert_same_bits(np.asarray(got)[finite], want[finite], "flush")


# ---------------------------------------------------------------------------
# Updates, compiled with jax.jit, against the C++ CPU kernels


LION = Variant("lion", "lion")
LION_WD = Variant("lion_wd", "lion", weight_decay=0.04)
VARIANTS = DENSE_VARIANTS + [LION, LION_WD]


def _jax_update(variant, rounding, traced):
    """A jitted update: (state dict of jax arrays, gradient, lr, step) -> new state."""

    def update(state, gradient, lr, momentum, step):
        comp = state.get("compensation")
        common = dict(rounding=rounding, compensation=comp, seed=SEED, step=step,
                      var_id=VAR_ID)
        if variant.op == "assign_add":
            new = jax_ops.rounded_assign_add(state["var"], gradient, **common)
        elif variant.op == "sgd":
            new = jax_ops.apply_sgd(state["var"], gradient, lr,
                                    momentum=momentum if variant.momentum else 0.0,
                                    accumulator=state.get("accum"), nesterov=variant.nesterov,
                                    weight_decay=variant.weight_decay, **common)
        elif variant.op == "lion":
            new = jax_ops.apply_lion(state["var"], gradient, state["m"], lr, beta_1=0.9,
                                     beta_2=0.99, weight_decay=variant.weight_decay, **common)
        else:
            new = jax_ops.apply_adam(state["var"], gradient, state["m"], state["v"], lr,
                                     beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                                     vhat=state.get("vhat"),
                                     weight_decay=variant.weight_decay, **common)
        roles = {"variable": "var", "accumulator": "accum"}
        return {roles.get(k, k): v for k, v in new.items()}

    if traced:
        return jax.jit(update)
    # Hyperparameters as Python constants (folded by XLA); the step stays traced.
    return jax.jit(lambda state, gradient, lr, momentum, step: update(
        state, gradient, LR, MOMENTUM, step))


def _kernel_update(variant, variables, gradient, rounding, step):
    comp = variables.get("compensation")
    common = dict(rounding=rounding, compensation=comp, seed=SEED, step=step, var_id=VAR_ID)
    if variant.op == "assign_add":
        return ops.rounded_assign_add(variables["var"], gradient, **common)
    if variant.op == "sgd":
        return ops.apply_sgd(variables["var"], gradient, LR,
                             momentum=MOMENTUM if variant.momentum else 0.0,
                             accumulator=variables.get("accum"), nesterov=variant.nesterov,
                             weight_decay=variant.weight_decay, **common)
    if variant.op == "lion":
        return ops.apply_lion(variables["var"], gradient, variables["m"], LR, beta_1=0.9,
                              beta_2=0.99, weight_decay=variant.weight_decay, **common)
    return ops.apply_adam(variables["var"], gradient, variables["m"], variables["v"], LR,
                          beta_1=0.9, beta_2=0.999, epsilon=1e-7, vhat=variables.get("vhat"),
                          weight_decay=variant.weight_decay, **common)


STEPS = 3


# Traced hyperparameters for every dtype combination; Python constants (which
# XLA folds, leaving only the flush between products and sums) on bf16.
MODES = [(d, g, True) for d in DTYPES for g in DTYPES] + [(tf.bfloat16, tf.bfloat16, False)]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize(
    "dtype,gdtype,traced", MODES,
    ids=lambda v: v.name if hasattr(v, "name") else ("traced" if v else "constant"))
@pytest.mark.parametrize("variant", VARIANTS, ids=repr)
def test_jitted_update_matches_kernel(variant, dtype, gdtype, traced, rounding):
    update = _jax_update(variant, rounding, traced)
    checker = BitChecker()
    rng = np.random.default_rng(zlib.crc32(f"{variant}/{dtype.name}/{gdtype.name}/{rounding}"
                                           .encode()))
    for shape, kind in DENSE_CASES:
        state = _initial_state(rng, variant, shape, dtype, rounding, kind)
        variables = {role: tf.Variable(value) for role, value in state.items()}
        jax_state = {role: to_jax(value) for role, value in state.items()}
        for step in range(STEPS):
            gradient = _tensor(_values(rng, shape, kind), gdtype)
            _kernel_update(variant, variables, gradient, rounding, step)
            jax_state = update(jax_state, to_jax(gradient), jnp.float32(LR),
                               jnp.float32(MOMENTUM), jnp.int32(step))
            assert jax_state.keys() == variables.keys()
            for role in variables:
                checker.compare(np.asarray(jax_state[role]), variables[role],
                                f"{variant} shape={shape} kind={kind} step={step}, {role}")
    checker.finish()


def test_bias_correction_matches_the_tensorflow_wrapper():
    from tf_bf16 import _args

    steps = np.arange(0, 3000, 7, dtype=np.int32)
    for beta in (0.9, 0.999, 0.95):
        want = np.array([_args.bias_correction_powers(beta, beta, int(s))[0].numpy()
                         for s in steps], np.float32)
        got = jax.jit(lambda s: jax.lax.map(
            lambda t: jax_ops.bias_correction_powers(beta, beta, t)[0], s))(steps)
        assert_same_bits(got, want, f"beta={beta}")


# ---------------------------------------------------------------------------
# Arguments


def test_bad_arguments_are_refused_with_the_argument_named():
    w = jnp.zeros((3, 2), jnp.bfloat16)
    g = jnp.zeros((3, 2), jnp.bfloat16)
    with pytest.raises(ValueError, match="'variable'.*float16"):
        jax_ops.apply_sgd(jnp.zeros(3, jnp.float16), jnp.zeros(3, jnp.float16), 0.1)
    with pytest.raises(ValueError, match="'gradient'.*shape"):
        jax_ops.apply_sgd(w, jnp.zeros((2, 3), jnp.bfloat16), 0.1, rounding="nearest")
    with pytest.raises(ValueError, match="needs `compensation`"):
        jax_ops.apply_sgd(w, g, 0.1, rounding="kahan")
    with pytest.raises(ValueError, match="only used by rounding='kahan'"):
        jax_ops.apply_sgd(w, g, 0.1, rounding="stochastic", compensation=w)
    with pytest.raises(ValueError, match="'m'.*dtype"):
        jax_ops.apply_adam(w, g, jnp.zeros((3, 2)), w, 0.1, rounding="nearest")
    with pytest.raises(ValueError, match="'learning_rate' is nan"):
        jax_ops.apply_sgd(w, g, float("nan"), rounding="nearest")
    with pytest.raises(ValueError, match="'learning_rate' is -0.1"):
        jax_ops.apply_lion(w, g, w, -0.1, rounding="nearest")
    with pytest.raises(ValueError, match="'beta_2' is 1.0"):
        jax_ops.apply_adam(w, g, w, w, 0.1, beta_2=1.0, rounding="nearest")
    with pytest.raises(ValueError, match="rounding must be one of"):
        jax_ops.apply_sgd(w, g, 0.1, rounding="up")
    with pytest.raises(ValueError, match="nesterov=True needs an accumulator"):
        jax_ops.apply_sgd(w, g, 0.1, nesterov=True, rounding="nearest")
    with pytest.raises(ValueError, match="'seed'.*64-bit"):
        jax_ops.stochastic_round(jnp.zeros(2), 2**64)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        jax_ops.flat_index((2**16, 2**16))


def test_functions_are_pure_and_jit_able_with_static_configuration():
    w = jnp.asarray(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), jnp.bfloat16)
    c = jnp.zeros_like(w)
    update = jax.jit(functools.partial(jax_ops.apply_sgd, rounding="kahan", seed=3))
    new = update(w, jnp.ones_like(w), 1e-3, compensation=c, step=jnp.int32(0))
    assert set(new) == {"variable", "compensation"}
    assert np.asarray(w).tolist() == np.asarray(
        jnp.asarray(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), jnp.bfloat16)
    ).tolist()  # the input is untouched
    assert np.any(np.asarray(new["compensation"]) != 0)
