"""tf_bf16's optimizers behave as Keras 3.15's where Keras users look.

- Keras's own optimizer test files, run unmodified with tf_bf16's classes
  swapped in (tools/run_keras_optimizer_tests.py), fail only where the
  documented differences say.
- `exclude_from_weight_decay(var_names=[...])` selects the variables Keras
  selects: on the TensorFlow backend Keras matches the names against the
  `tf.Variable`'s name, which is the variable's path (`"<model>/<layer>/kernel:0"`),
  so a layer name excludes that layer's weights.
- `name=None` gives Keras's automatic, uniquified names.
- Adam's `1 - beta` constants are Keras's (float64 in Python, then float32):
  one step on float32 weights is Keras's bit for bit, and on bfloat16 weights
  it is Keras's float32 step rounded as the rounding mode says.
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bf16
from tf_bf16 import ROUNDINGS
from conftest import assert_bits_equal, bits, fresh_global_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMIZER_NAMES = ("SGD", "Adam", "AdamW", "Lion")

restore_global_state = fresh_global_state(20)


# ---------------------------------------------------------------------------
# Keras's own test suite


@pytest.mark.slow
def test_keras_optimizer_test_suite_with_tf_bf16_swapped_in(tmp_path):
    """Every test of Keras's optimizer test files passes, except the listed
    differences (each with its reason in the runner); a listed difference that
    passes again, or a test module that did not get tf_bf16's class, fails too."""
    report = tmp_path / "keras_suite.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "run_keras_optimizer_tests.py"),
         "--quiet", "--json", str(report)],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    outcome = json.loads(report.read_text())
    assert outcome["unexpected"] == [] and outcome["stale"] == []
    assert outcome["not_swapped"] == []
    # Every module of the suite that names a swapped class got tf_bf16's.
    assert {"sgd_test.SGD", "adam_test.Adam", "adamw_test.AdamW", "lion_test.Lion",
            "optimizer_test.Adam", "loss_scale_optimizer_test.SGD"} <= set(
                outcome["classes_seen"])
    # The suite ran (about 140 tests in Keras 3.15.1), and only the listed tests failed.
    assert outcome["counts"]["passed"] >= 120
    assert outcome["counts"]["failed"] == len(outcome["expected_differences"])


# ---------------------------------------------------------------------------
# Weight-decay exclusion by name


def two_layer_model(dtype):
    """A Sequential model: its variables' paths start with the model's name."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense_a", dtype=dtype),
                             keras.layers.Dense(2, name="dense_b", dtype=dtype)], name="net")


def decayed_variables(optimizer_class, dtype, exclude, weight_decay=0.3, steps=3, **kwargs):
    """Paths of the variables whose values differ from an undecayed run (same
    fixed gradients, applied directly: no backpropagation couples the layers)."""
    rng = np.random.default_rng(1)
    model = two_layer_model(dtype)
    initial = [v.numpy() for v in model.trainable_variables]
    grads = [[rng.standard_normal(v.shape).astype(np.float32) for v in initial]
             for _ in range(steps)]

    def run(decay):
        for v, w in zip(model.trainable_variables, initial):
            v.assign(w)
        optimizer = optimizer_class(learning_rate=0.05, weight_decay=decay, **kwargs)
        if exclude:
            optimizer.exclude_from_weight_decay(var_names=exclude)
        for step in grads:
            optimizer.apply_gradients(
                [(tf.cast(g, dtype), v) for g, v in zip(step, model.trainable_variables)])
        return [v.numpy() for v in model.trainable_variables]

    decayed, undecayed = run(weight_decay), run(0.0)
    paths = [v.path for v in model.trainable_variables]
    assert paths == ["net/dense_a/kernel", "net/dense_a/bias", "net/dense_b/kernel",
                     "net/dense_b/bias"]
    result = set()
    for path, a, b in zip(paths, decayed, undecayed):
        if not np.array_equal(bits(a), bits(b)):
            result.add(path)
        else:   # excluded: exactly the undecayed update (weight decay 0 is skipped)
            assert_bits_equal(a, b, path)
    return result


EXCLUSIONS = [["dense_a"], ["bias"], ["dense_b/kernel"], ["net"], ["kernel:0"]]


@pytest.mark.parametrize("exclude", EXCLUSIONS, ids=lambda e: e[0])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_exclude_from_weight_decay_by_layer_name_selects_what_keras_selects(name, exclude):
    keras_selection = decayed_variables(getattr(keras.optimizers, name), "float32", exclude)
    everything = {"net/dense_a/kernel", "net/dense_a/bias", "net/dense_b/kernel",
                  "net/dense_b/bias"}
    # What Keras 3.15 does on the TensorFlow backend (the premise of this test).
    expected = {"dense_a": everything - {"net/dense_a/kernel", "net/dense_a/bias"},
                "bias": {"net/dense_a/kernel", "net/dense_b/kernel"},
                "dense_b/kernel": everything - {"net/dense_b/kernel"},
                "net": set(), "kernel:0": {"net/dense_a/bias", "net/dense_b/bias"}}
    assert keras_selection == expected[exclude[0]]
    for dtype in ("float32", "bfloat16"):
        for rounding in ROUNDINGS:
            optimizer_class = getattr(tf_bf16.optimizers, name)
            got = decayed_variables(
                lambda **kw: optimizer_class(rounding=rounding, seed=3, **kw), dtype, exclude)
            assert got == keras_selection, (dtype, rounding)


def test_exclude_from_weight_decay_by_layer_name_in_fit():
    """Through model.fit under the policy: the excluded layer's kernel moves
    exactly as with weight_decay=0 in the first step (before decay elsewhere
    can change its gradient)."""
    tf_bf16.set_policy()
    x = np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32)
    y = np.random.default_rng(3).standard_normal((8, 2)).astype(np.float32)

    def first_step(decay):
        keras.utils.set_random_seed(5)
        model = two_layer_model(None)
        optimizer = tf_bf16.optimizers.AdamW(learning_rate=0.01, weight_decay=decay,
                                             rounding="stochastic", seed=1)
        optimizer.exclude_from_weight_decay(var_names=["dense_a"])
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        return {v.path: v.numpy() for v in model.trainable_variables}

    decayed, undecayed = first_step(0.5), first_step(0.0)
    assert_bits_equal(decayed["net/dense_a/kernel"], undecayed["net/dense_a/kernel"], "dense_a")
    assert not np.array_equal(bits(decayed["net/dense_b/kernel"]),
                              bits(undecayed["net/dense_b/kernel"]))


# ---------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_default_names_are_keras_automatic_names(name):
    from keras.src.utils.naming import to_snake_case

    stem = to_snake_case(name)   # Keras 3.15: "sgd", "adam", "adam_w", "lion"
    first, second = getattr(tf_bf16.optimizers, name)(), getattr(tf_bf16.optimizers, name)()
    stock = getattr(keras.optimizers, name)()
    for optimizer in (first, second, stock):
        assert re.fullmatch(rf"{stem}(_\d+)?", optimizer.name), optimizer.name
    assert len({first.name, second.name, stock.name}) == 3   # uniquified, one counter
    named = getattr(tf_bf16.optimizers, name)(name="mine")
    assert named.name == "mine"
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(second))
    assert type(restored) is type(second) and restored.name == second.name


# ---------------------------------------------------------------------------
# Adam's 1 - beta constants


def adam_problem(n=4096, seed=4):
    """bf16-exact weights and gradients (both sides start from the same numbers)."""
    rng = np.random.default_rng(seed)
    w0 = np.asarray(tf.cast(rng.standard_normal(n), tf.bfloat16), np.float32)
    g = np.asarray(tf.cast(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 1, n),
                           tf.bfloat16), np.float32)
    return w0, g


def one_adam_step(optimizer, w0, g, dtype):
    variable = keras.Variable(w0, dtype=dtype, name="w")
    optimizer.apply_gradients([(tf.cast(g, dtype), variable)])
    index = optimizer._get_variable_index(variable)
    as_f32 = [np.asarray(tf.cast(x, tf.float32))
              for x in (variable.value, optimizer._momentums[index].value,
                        optimizer._velocities[index].value)]
    return as_f32


def bf16_neighbours(x):
    """The bf16 values next to float32 `x`: toward zero and away from zero."""
    toward = np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return toward.view(np.float32), (toward + np.uint32(0x10000)).view(np.float32)


def rne_bf16(x):
    return np.asarray(tf.cast(tf.cast(np.asarray(x, np.float32), tf.bfloat16), tf.float32))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_float32_step_is_keras_bit_for_bit(amsgrad):
    """Keras computes `1 - beta` in Python float64 and rounds it to float32;
    tf_bf16 passes that constant to its op, so the float32 arithmetic is Keras's
    (over ten steps, with the moments built up)."""
    w0, g = adam_problem()
    rng = np.random.default_rng(6)
    steps = [g * rng.uniform(0.1, 2.0, g.shape).astype(np.float32) for _ in range(10)]
    results = []
    for optimizer in (keras.optimizers.Adam(learning_rate=0.01, amsgrad=amsgrad),
                      tf_bf16.optimizers.Adam(learning_rate=0.01, amsgrad=amsgrad, seed=1)):
        variable = keras.Variable(w0, name="w")
        for gradient in steps:
            optimizer.apply_gradients([(tf.constant(gradient), variable)])
        results.append(variable.numpy())
    assert_bits_equal(results[1], results[0], "tf_bf16 Adam vs Keras Adam, float32")


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_adam_bf16_step_is_keras_float32_step_rounded(rounding):
    """One step from zero moments on bf16 weights. tf_bf16 computes Keras's
    float32 numbers (same constants, same operations) and rounds each stored
    value once. Tolerances, from bf16's spacing:

    - nearest: the weight is RNE(w + delta), the moments RNE(m'), RNE(v'):
      Keras's float32 results rounded to nearest, bit for bit;
    - stochastic: each stored value is one of the two bf16 neighbours of
      Keras's float32 value;
    - kahan: the moments as stochastic; the weight is RNE(w + RNE(delta))
      (docs/rounding.md 4), within half a spacing of w1 plus the rounding of
      delta (bf16's unit roundoff 2^-8 times |delta|) of Keras's float32 weight.

    With tf.raw_ops.ResourceApplyAdam's constant (1 - float32(0.999), 1.3e-5
    relative smaller) RNE(v') differs in 25 of these 4096 elements: the
    nearest case sees it."""
    w0, g = adam_problem()
    w32, m32, v32 = one_adam_step(keras.optimizers.Adam(learning_rate=0.01), w0, g, "float32")
    w16, m16, v16 = one_adam_step(
        tf_bf16.optimizers.Adam(learning_rate=0.01, rounding=rounding, seed=2), w0, g,
        "bfloat16")
    stored = {"m": (m16, m32), "v": (v16, v32)}
    if rounding == "nearest":
        stored["w"] = (w16, w32)
        for role, (got, want) in stored.items():
            assert_bits_equal(got, rne_bf16(want), f"{role}: RNE of Keras's float32 value")
        return
    if rounding == "stochastic":
        stored["w"] = (w16, w32)
    else:
        delta = w32.astype(np.float64) - w0
        spacing = np.array([np.spacing(np.float32(x)) for x in np.abs(w16)], np.float64) \
            * 2.0**16   # bf16 spacing of |w1|: float32 spacing times 2^16
        err = np.abs(w16.astype(np.float64) - w32)
        assert np.all(err <= spacing / 2 + 2.0**-8 * np.abs(delta)), np.max(err / spacing)
    for role, (got, want) in stored.items():
        toward, away = bf16_neighbours(want)
        ok = (bits(got) == bits(toward)) | (bits(got) == bits(away))
        assert np.all(ok), f"{role}: {np.count_nonzero(~ok)} values not a bf16 neighbour"
