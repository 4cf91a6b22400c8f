"""tf_bf16.optimizers against Keras's own optimizers, and in pure bfloat16.

float32 variables: the tf_bf16 optimizers update them exactly, so they must
reproduce Keras. Each side is first checked bit for bit against a numpy
float32 emulation of its own formula; where the two formulas are the same
float32 operations (SGD, Adam, AMSGrad and Lion without weight decay) the
results are compared bit for bit; where they differ the two are compared
within a per-element bound derived from that difference (see
`parity_bound`). The one difference: decoupled weight decay is folded into
the update (one rounding per step) instead of Keras's separate
`w -= w * wd * lr` assign. (Adam's `1 - beta` constants are Keras's: computed
in Python float64, then rounded to float32; docs/rounding.md 5.3.)

bfloat16 variables: every optimizer and rounding moves the weights (stock
Keras Adam does not: NOTES.md), the optimizer state is bfloat16, Kahan buffers
exist only where they are used, and Keras's features (schedules, clipping,
weight-decay exclusion, EMA, gradient accumulation, sparse gradients,
serialization) behave as in Keras.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bf16
from tf_bf16 import ROUNDINGS
from tf_bf16 import optimizers as bf16_optimizers

from conftest import assert_bits_equal, bits, fresh_global_state

F32 = np.float32
U_F32 = 2.0**-24          # float32 unit roundoff
OPTIMIZER_NAMES = ("SGD", "Adam", "AdamW", "Lion")


restore_global_state = fresh_global_state(1234)


def keras_optimizer(name, **kwargs):
    return getattr(keras.optimizers, name)(**kwargs)


def bf16_optimizer(name, **kwargs):
    kwargs.setdefault("seed", 17)
    return getattr(bf16_optimizers, name)(**kwargs)


def as_f32(x):
    return np.asarray(tf.cast(tf.convert_to_tensor(x), tf.float32))


# ---------------------------------------------------------------------------
# numpy emulation of both formulations


def hyperparameters(optimizer):
    """The float values an optimizer instance computes with."""
    hp = {"learning_rate": float(optimizer.learning_rate.numpy()),
          "weight_decay": optimizer.weight_decay}
    for attr in ("momentum", "nesterov", "beta_1", "beta_2", "epsilon", "amsgrad"):
        if hasattr(optimizer, attr):
            hp[attr] = getattr(optimizer, attr)
    return hp


def _pow(base, t, ftype):
    # Both implementations call tf.pow in float32 (Keras's ops.power / _args).
    if ftype == np.float32:
        return tf.pow(tf.constant(base, tf.float32), tf.constant(t, tf.float32)).numpy()
    return np.power(np.float64(F32(base)), t)


def emulate(kind, hp, w0s, grads, formulation, ftype=np.float32):
    """Weight trajectories ([variable][step] arrays, step 0 = initial value).

    `formulation` is "keras" (keras/src/optimizers/*.py) or "tf_bf16"
    (docs/rounding.md section 5). With ftype=float32 every numpy operation is
    one IEEE float32 operation rounded to nearest, as in TensorFlow's CPU
    kernels; with float64 it gives the same formulas almost exactly, to
    measure the effect of their different constants.
    """
    c = lambda x: ftype(F32(x))  # noqa: E731  a float32 constant in ftype
    one = ftype(1)
    learning_rates = hp["learning_rate"]
    if np.ndim(learning_rates) == 0:
        learning_rates = [learning_rates] * len(grads)
    wd = None if hp["weight_decay"] is None else c(hp["weight_decay"])
    keras_form = formulation == "keras"
    lr = None   # the step's learning rate, set in the loops below

    def decay_keras(w):
        return w - (w * wd) * lr if (keras_form and wd is not None) else w

    def commit(w, update):
        """w - update (Keras: decay already applied), or tf_bf16's folded decay."""
        if keras_form:
            return w - update
        delta = -update
        if wd is not None and wd != 0:
            delta = delta - (w * wd) * lr
        return w + delta

    trajectories = []
    for i, w0 in enumerate(w0s):
        w = np.asarray(w0).astype(ftype)
        zeros = np.zeros_like(w)
        traj = [w]
        if kind == "SGD":
            mu = c(hp["momentum"])
            slot = zeros
            for t, step in enumerate(grads):
                g = np.asarray(step[i]).astype(ftype)
                lr = c(learning_rates[t])
                if keras_form:
                    w = decay_keras(w)
                    if hp["momentum"] != 0:
                        slot = slot * mu - g * lr
                        w = w + (slot * mu - g * lr) if hp["nesterov"] else w + slot
                    else:
                        w = w - g * lr
                else:   # Keras's formulation, weight decay folded into the update
                    if hp["momentum"] != 0:
                        slot = slot * mu - g * lr
                        update = -(slot * mu - g * lr) if hp["nesterov"] else -slot
                    else:
                        update = g * lr
                    w = commit(w, update)
                traj.append(w)
        elif kind in ("Adam", "AdamW"):
            b1, b2, eps = hp["beta_1"], hp["beta_2"], c(hp["epsilon"])
            # Both: Python float64 (1 - beta), then float32 (docs/rounding.md 5.3).
            omb1, omb2 = c(1 - b1), c(1 - b2)
            m, v, vhat = zeros, zeros, zeros
            for t, step in enumerate(grads):
                g = np.asarray(step[i]).astype(ftype)
                lr = c(learning_rates[t])
                k = hp.get("iterations", range(len(grads)))[t]   # the optimizer's count
                b1p, b2p = ftype(_pow(b1, k + 1, ftype)), ftype(_pow(b2, k + 1, ftype))
                alpha = lr * np.sqrt(one - b2p) / (one - b1p)
                w = decay_keras(w)
                m = m + (g - m) * omb1
                v = v + (g * g - v) * omb2
                if hp["amsgrad"]:
                    vhat = np.maximum(vhat, v)
                update = (m * alpha) / (np.sqrt(vhat if hp["amsgrad"] else v) + eps)
                w = commit(w, update)
                traj.append(w)
        elif kind == "Lion":
            b1, b2 = c(hp["beta_1"]), c(hp["beta_2"])
            m = zeros
            for t, step in enumerate(grads):
                g = np.asarray(step[i]).astype(ftype)
                lr = c(learning_rates[t])
                w = decay_keras(w)
                update = lr * np.sign(m * b1 + g * (one - b1))
                w = commit(w, update)
                m = m * b2 + g * (one - b2)
                traj.append(w)
        else:
            raise ValueError(kind)
        trajectories.append([np.asarray(x, ftype) for x in traj])
    return trajectories


def parity_bound(kind, hp, w0s, grads, keras_trajectories):
    """Per-element bound on |tf_bf16 - Keras| for float32 variables.

    Two contributions, added:

    1. The different formulas: the float64 emulations of both formulations
       differ by D; float64 rounding is 2^-29 times smaller than float32's,
       so D is the exact effect of the formulas. It is ~0 where only the
       rounding differs (weight decay folded into the update).
    2. float32 rounding: against its float64 counterpart, each side's weight
       picks up at most half an ulp per step when it is committed, and its
       update u_t at most 4t unit roundoffs (<= 4 rounded operations per
       step, carried linearly through the momentum/moment recurrences for t
       steps; errors in w are not amplified: the update does not depend on w,
       or shrinks it with weight decay). Both sides together:
       sum_t (ulp(w_t) + 8 t 2^-24 |u_t|).
    """
    exact_tf = emulate(kind, hp, w0s, grads, "tf_bf16", np.float64)
    exact_keras = emulate(kind, hp, w0s, grads, "keras", np.float64)
    bounds = []
    for traj, a, b in zip(keras_trajectories, exact_tf, exact_keras):
        bound = np.abs(a[-1] - b[-1])
        for t in range(1, len(traj)):
            w_t = np.maximum(np.abs(traj[t]), np.abs(traj[t - 1])).astype(F32)
            u_t = np.abs(traj[t].astype(np.float64) - traj[t - 1])
            bound = bound + np.spacing(w_t).astype(np.float64) + 8 * t * U_F32 * u_t
        bounds.append(bound)
    return bounds


# ---------------------------------------------------------------------------
# Runs on float32 (or bf16) variables


def make_problem(seed=0, steps=10, shapes=((257,), (7, 5))):
    """Initial weights and per-step gradients (varying scale, so AMSGrad's max matters)."""
    rng = np.random.default_rng(seed)
    w0s = [rng.standard_normal(s).astype(F32) for s in shapes]
    scales = [3.0, 0.5, 1.0, 0.1, 2.0, 1.0, 0.3, 1.5, 0.7, 1.0][:steps]
    grads = [[(rng.standard_normal(s) * k).astype(F32) for s in shapes] for k in scales]
    return w0s, grads


def run_steps(optimizer, w0s, grads, dtype="float32"):
    """Applies `grads` step by step; returns ([variable][step] float32 arrays, variables)."""
    variables = [keras.Variable(w, dtype=dtype, name=f"v{i}") for i, w in enumerate(w0s)]
    traj = [[as_f32(v.value)] for v in variables]
    for step in grads:
        optimizer.apply_gradients(
            [(tf.cast(g, dtype), v) for g, v in zip(step, variables)])
        for t, v in zip(traj, variables):
            t.append(as_f32(v.value))
    return traj, variables


PARITY_CASES = {
    # name: (optimizer, kwargs, same float32 formulation as Keras?)
    "sgd": ("SGD", dict(learning_rate=0.1), True),
    "sgd_nesterov_no_momentum": ("SGD", dict(nesterov=True), True),
    "sgd_momentum": ("SGD", dict(learning_rate=0.1, momentum=0.9), True),
    "sgd_nesterov": ("SGD", dict(learning_rate=0.1, momentum=0.9, nesterov=True), True),
    "sgd_weight_decay": ("SGD", dict(learning_rate=0.1, weight_decay=0.05), False),
    "adam": ("Adam", dict(learning_rate=0.01), True),
    "adam_amsgrad": ("Adam", dict(learning_rate=0.01, amsgrad=True), True),
    "adamw": ("AdamW", dict(learning_rate=0.01, weight_decay=0.1), False),
    "adamw_amsgrad": ("AdamW", dict(learning_rate=0.01, amsgrad=True), False),
    "lion": ("Lion", dict(learning_rate=0.01), True),
    "lion_weight_decay": ("Lion", dict(learning_rate=0.01, weight_decay=0.5), False),
}


# Keras's own golden tests (keras/src/optimizers/*_test.py,
# test_correctness_with_golden): same configuration, inputs, values, tolerance.
KERAS_GOLDEN = {
    "SGD": (dict(nesterov=True), np.array(
        [[0.9999] * 10,
         [0.9989, 0.9979, 0.9969, 0.9959, 0.9949, 0.9939, 0.9929, 0.9919, 0.9909, 0.9899],
         [0.9979, 0.9959, 0.9939, 0.9919, 0.9899, 0.9879, 0.9859, 0.9839, 0.9819, 0.9799],
         [0.9969, 0.9939, 0.9909, 0.9879, 0.9849, 0.9819, 0.9789, 0.9759, 0.9729, 0.9699],
         [0.9959, 0.9919, 0.9879, 0.9839, 0.9799, 0.9759, 0.9719, 0.9679, 0.9639, 0.9599]])),
    "Adam": (dict(amsgrad=True),
             np.tile([[0.999], [0.9982], [0.9974], [0.9965], [0.9955]], (1, 10))),
    "AdamW": (dict(learning_rate=1.0, weight_decay=0.5, epsilon=2), np.array(
        [[0.4998] * 10,
         [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
         [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
         [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
         [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113,
          -0.0159]])),
    "Lion": ({}, np.tile([[0.999], [0.998], [0.997], [0.996], [0.995]], (1, 10))),
}


# Keras's test uses ops.full((10,), 0.01) once, then ops.arange(0.1, 1.1, 0.1).
GOLDEN_GRADIENTS = ([np.full(10, 0.01, F32)]
                    + [np.asarray(keras.ops.arange(0.1, 1.1, 0.1), F32)] * 5)


def golden_run(optimizer):
    """Keras's golden procedure; returns the weights before and after each step."""
    x = keras.Variable(np.ones([10], dtype="float32"))
    values = [x.numpy().copy()]
    for g in GOLDEN_GRADIENTS:
        optimizer.apply_gradients(zip([tf.constant(g)], [x]))
        values.append(x.numpy().copy())
    return values


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_keras_golden_values(name, rounding):
    kwargs, golden = KERAS_GOLDEN[name]
    got = golden_run(bf16_optimizer(name, rounding=rounding, **kwargs))
    # Keras checks the weights after steps 1..5 with this tolerance.
    np.testing.assert_allclose(np.array(got[1:6]), golden, rtol=5e-4, atol=5e-4)
    # The stock optimizer on the same inputs: within the parity bound at every step.
    reference = keras_optimizer(name, **kwargs)
    want = golden_run(reference)
    hp = hyperparameters(reference)
    for t in range(1, len(want)):
        (bound,) = parity_bound(name, hp, [want[0]], [[g] for g in GOLDEN_GRADIENTS[:t]],
                                [want[:t + 1]])
        err = np.abs(got[t].astype(np.float64) - want[t])
        assert np.all(err <= bound), (name, t, err, bound)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_float32_parity_with_stock_keras(case, rounding):
    name, kwargs, same_formulation = PARITY_CASES[case]
    w0s, grads = make_problem()
    reference = keras_optimizer(name, **kwargs)
    want, _ = run_steps(reference, w0s, grads)
    got, _ = run_steps(bf16_optimizer(name, rounding=rounding, **kwargs), w0s, grads)
    hp = hyperparameters(reference)

    # Each side is exactly its own documented float32 formula ...
    for side, traj in (("keras", want), ("tf_bf16", got)):
        emulated = emulate(name, hp, w0s, grads, side)
        for i, (a, b) in enumerate(zip(traj, emulated)):
            assert_bits_equal(a[-1], b[-1], f"{case}: {side} vs its float32 emulation, var {i}")

    # ... so they are equal bit for bit where the formulas are the same, and
    # within the bound derived from the difference otherwise.
    if same_formulation:
        for i, (a, b) in enumerate(zip(got, want)):
            assert_bits_equal(a[-1], b[-1], f"{case}: tf_bf16 vs keras, var {i}")
        return
    bounds = parity_bound(name, hp, w0s, grads, want)
    for i, (a, b, bound) in enumerate(zip(got, want, bounds)):
        err = np.abs(a[-1].astype(np.float64) - b[-1])
        assert np.all(err <= bound), (
            f"{case} var {i}: max excess {np.max(err - bound):.3g}, max err {err.max():.3g}")
    # The bound is tight enough to matter: it is far below the size of one step.
    for a, b, bound in zip(got, want, bounds):
        assert np.median(bound) < 1e-3 * np.median(np.abs(b[-1] - b[-2]))


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_float32_roundings_give_identical_results(case):
    """The rounding only applies to bfloat16: on float32 it must change no bit."""
    name, kwargs, _ = PARITY_CASES[case]
    w0s, grads = make_problem(seed=3)
    results = {}
    for rounding in ROUNDINGS:
        optimizer = bf16_optimizer(name, rounding=rounding, **kwargs)
        _, variables = run_steps(optimizer, w0s, grads)
        state = [v for v in optimizer.variables if "kahan" not in v.path]
        results[rounding] = [v.numpy() for v in variables] + [v.numpy() for v in state]
    for rounding in ROUNDINGS[1:]:
        assert len(results[rounding]) == len(results[ROUNDINGS[0]])
        for i, (a, b) in enumerate(zip(results[rounding], results[ROUNDINGS[0]])):
            assert_bits_equal(a, b, f"{case}: {rounding} vs {ROUNDINGS[0]}, tensor {i}")


# ---------------------------------------------------------------------------
# Pure bfloat16


def bf16_spacing(x):
    """Gap between the bf16 neighbours of |x| (normal numbers): 2^(exponent - 7)."""
    x = np.maximum(np.abs(np.asarray(x, np.float64)), 2.0**-126)
    return 2.0 ** (np.floor(np.log2(x)) - 7)


def sign_consistent_problem(n=512, steps=20, low=None, seed=5):
    """bf16-exact initial weights (N(0,1), or in [1.0625, 1.9375] * low) and gradients
    whose sign is fixed per element, so every optimizer moves each weight steadily."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal(n) if low is None
          else low * (1.0625 + 0.875 * rng.random(n))).astype(F32)
    w0 = as_f32(tf.cast(w0, tf.bfloat16))
    sign = np.where(rng.random(n) < 0.5, -1, 1).astype(F32)
    grads = [[sign * (0.5 + 0.5 * rng.random(n)).astype(F32)] for _ in range(steps)]
    return w0, sign, grads


def sr_mean_bound(reference, rounded, n_sigma=5.0):
    """5 standard errors of the mean final error of stochastically rounded weights.

    Each step's SR error of an element is independent (distinct steps and
    element indices draw independent bits: tests/test_stochastic_rounding.py),
    has mean 0 and variance at most spacing^2 / 4, where the spacing is that
    of the binade the weight is in (the larger of the float32 and the bf16
    trajectory's); the weight updates do not depend on the weight, so the
    errors add: Var(final error) <= sum_t spacing_t^2 / 4.
    """
    spacing = np.maximum(bf16_spacing(np.array(reference)[1:]),
                         bf16_spacing(np.array(rounded)[1:]))
    var = np.sum(spacing**2 / 4, axis=0)
    return n_sigma * math.sqrt(np.sum(var)) / spacing.shape[1]


def test_stock_keras_adam_does_not_move_bf16_weights():
    """The motivating bug (NOTES.md): beta_2 = 0.999 is 1.0 in bf16, the step size 0."""
    w0, _, grads = sign_consistent_problem(steps=10)
    for name in ("Adam", "AdamW"):
        traj, _ = run_steps(keras_optimizer(name), [w0], grads, "bfloat16")
        assert np.count_nonzero(traj[0][-1] != w0) == 0, name
    # The same with a 10x larger learning rate: the step size is exactly 0.
    traj, _ = run_steps(keras_optimizer("Adam", learning_rate=0.01), [w0], grads, "bfloat16")
    assert np.count_nonzero(traj[0][-1] != w0) == 0


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_pure_bf16_training_moves_weights(name, rounding):
    """Default hyperparameters, bf16 weights ~ N(0, 1), 20 steps."""
    w0, sign, grads = sign_consistent_problem()
    ref, _ = run_steps(bf16_optimizer(name), [w0], grads, "float32")
    got, variables = run_steps(bf16_optimizer(name, rounding=rounding), [w0], grads, "bfloat16")
    assert variables[0].dtype == "bfloat16"
    d32, d16 = ref[0][-1] - w0, got[0][-1] - w0
    assert np.all(np.isfinite(d16))
    assert np.count_nonzero(d16) > 0
    if rounding == "nearest":
        return
    # Stochastic rounding and Kahan summation move (nearly) every weight ...
    assert np.mean(d16 != 0) > 0.9
    # ... by the float32 amount: SR on average (unbiased), Kahan per element.
    if rounding == "stochastic":
        assert abs(np.mean((d16 - d32) * sign)) <= sr_mean_bound(ref[0], got[0])
    else:
        # The Kahan weight is within half a bf16 spacing of the compensated
        # sum (|compensation| <= half a spacing), which misses the float32 sum
        # by the bf16 rounding of each update (2^-9 relative, same sign every
        # step here) and, for Adam and Lion, the effect of storing the moments
        # in bf16 (stochastically rounded: at most 2^-7 relative per step,
        # unbiased): one spacing + 2^-6 |d32| holds with room.
        err = np.abs(d16 - d32)
        spacing = bf16_spacing(np.maximum(np.abs(w0), np.abs(got[0][-1])))
        assert np.all(err <= spacing + 2.0**-6 * np.abs(d32)), np.max(err / spacing)


SMALL_STEP = {  # steps below half the bf16 spacing of [1, 2) (2^-7 / 2), see the premise
    "SGD": dict(learning_rate=1e-3),
    "SGD_momentum": dict(learning_rate=4e-4, momentum=0.9),
    "Adam": dict(learning_rate=1e-3),
    "AdamW": dict(learning_rate=1e-3),
    "Lion": dict(learning_rate=1e-3),
}


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("case", sorted(SMALL_STEP))
def test_small_steps_lost_to_nearest_kept_by_stochastic_and_kahan(case, rounding):
    """Every update is below half a bf16 spacing (2^-8 for weights in [1, 2)):
    round-to-nearest never moves a weight, SR and Kahan follow float32."""
    name = case.split("_")[0]
    kwargs = SMALL_STEP[case]
    w0, sign, grads = sign_consistent_problem(low=1.0, steps=12)
    ref, _ = run_steps(bf16_optimizer(name, **kwargs), [w0], grads, "float32")
    steps = np.abs(np.diff(np.array(ref[0]), axis=0))
    assert steps.max() < 2.0**-8    # the premise: every step is lost to RNE ...
    d32 = ref[0][-1] - w0
    assert np.all(np.abs(d32) > 2.0**-8)    # ... but together they are not
    got, _ = run_steps(bf16_optimizer(name, rounding=rounding, **kwargs), [w0], grads,
                       "bfloat16")
    d16 = got[0][-1] - w0
    if rounding == "nearest":
        assert np.count_nonzero(d16) == 0
        stock, _ = run_steps(keras_optimizer(name, **kwargs), [w0], grads, "bfloat16")
        assert np.count_nonzero(stock[0][-1] - w0) == 0
    elif rounding == "stochastic":
        assert np.mean(d16 != 0) > 0.5
        assert abs(np.mean((d16 - d32) * sign)) <= sr_mean_bound(ref[0], got[0])
    else:
        assert np.all(d16 != 0)
        # As above: one bf16 spacing (2^-7 in [1, 2)) + 2^-6 |d32|.
        assert np.all(np.abs(d16 - d32) <= 2.0**-7 + 2.0**-6 * np.abs(d32))


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_is_bf16_and_kahan_buffers_only_where_used(name, rounding):
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    if name == "Adam":
        kwargs["amsgrad"] = True
    optimizer = bf16_optimizer(name, rounding=rounding, use_ema=True,
                               gradient_accumulation_steps=2, **kwargs)
    w_bf16 = keras.Variable(np.ones((3, 4), F32), dtype="bfloat16", name="w_bf16")
    w_f32 = keras.Variable(np.ones((5,), F32), dtype="float32", name="w_f32")
    optimizer.build([w_bf16, w_f32])
    slots_per_variable = {"SGD": 1, "Adam": 3, "AdamW": 2, "Lion": 1}[name]
    by_dtype = {"bfloat16": [], "float32": []}
    for v in optimizer.variables:
        if v is optimizer._iterations:
            assert v.dtype == "int64"
        elif v is optimizer._learning_rate:
            assert v.dtype == "float32"
        elif v is optimizer.rounding_seed:
            assert v.dtype == "int32" and tuple(v.shape) == ()
        else:
            # Slots, EMA averages and accumulators follow the variable's dtype.
            assert tuple(v.shape) in ((3, 4), (5,)), v.path
            expected = "bfloat16" if tuple(v.shape) == (3, 4) else "float32"
            assert v.dtype == expected, v.path
            by_dtype[v.dtype].append(v)
    kahan = [v for v in optimizer.variables if "kahan_compensation" in v.path]
    if rounding == "kahan":
        assert len(kahan) == 1 and kahan[0].dtype == "bfloat16"
        assert tuple(kahan[0].shape) == (3, 4)
        assert optimizer._compensations[0] is kahan[0]
        assert np.all(as_f32(kahan[0].value) == 0)
    else:
        assert kahan == []
        assert optimizer._compensations[0] is None
    assert optimizer._compensations[1] is None       # never for float32 variables
    # slots + EMA average + gradient accumulator (+ Kahan buffer for bf16)
    assert len(by_dtype["float32"]) == slots_per_variable + 2
    assert len(by_dtype["bfloat16"]) == slots_per_variable + 2 + (rounding == "kahan")
    # A step keeps every dtype.
    optimizer.apply_gradients([(tf.ones((3, 4), tf.bfloat16), w_bf16),
                               (tf.ones((5,)), w_f32)])
    assert w_bf16.dtype == "bfloat16" and w_f32.dtype == "float32"


# ---------------------------------------------------------------------------
# Keras features: schedules, clipping, weight-decay exclusion, EMA,
# gradient accumulation, sparse gradients.


def assert_parity(name, kwargs, got, want, w0s, grads, hp, what):
    """Bitwise where the float32 formulation is Keras's (SGD, with or without
    momentum, and Lion, both without weight decay), else within `parity_bound`."""
    same = name in ("SGD", "Lion") and not kwargs.get("weight_decay")
    if same:
        for i, (a, b) in enumerate(zip(got, want)):
            assert_bits_equal(a[-1], b[-1], f"{what}: var {i}")
        return
    for i, (a, b, bound) in enumerate(zip(got, want, parity_bound(name, hp, w0s, grads, want))):
        err = np.abs(a[-1].astype(np.float64) - b[-1])
        assert np.all(err <= bound), f"{what}: var {i}: max excess {np.max(err - bound):.3g}"


def counting_update_step(optimizer):
    """Counts Python calls of update_step: in a tf.function, one per trace and variable."""
    calls = []
    original = optimizer.update_step

    def update_step(gradient, variable, learning_rate):
        calls.append(variable.name)
        return original(gradient, variable, learning_rate)

    optimizer.update_step = update_step
    return calls


SCHEDULE_CASES = {
    "SGD": {}, "SGD_momentum": {"momentum": 0.9}, "Adam": {}, "AdamW": {"weight_decay": 0.05},
    "Lion": {},
}


@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_learning_rate_schedule_matches_keras_without_retracing(case):
    name = case.split("_")[0]
    kwargs = SCHEDULE_CASES[case]
    w0s, grads = make_problem(seed=7, steps=8)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)

    def run(optimizer):
        variables = [keras.Variable(w, name=f"v{i}") for i, w in enumerate(w0s)]
        optimizer.build(variables)          # no variable creation inside the trace
        calls = counting_update_step(optimizer)

        @tf.function
        def train_step(step_grads):
            optimizer.apply_gradients(zip(step_grads, variables))

        traj = [[w] for w in w0s]
        for step in grads:
            train_step([tf.constant(g) for g in step])
            for t, v in zip(traj, variables):
                t.append(v.numpy())
        return traj, calls, optimizer

    want, keras_calls, reference = run(keras_optimizer(name, learning_rate=schedule, **kwargs))
    got, calls, optimizer = run(bf16_optimizer(name, learning_rate=schedule, **kwargs))
    assert len(calls) == len(w0s) == len(keras_calls)   # traced once: no retracing
    assert int(optimizer.iterations.numpy()) == len(grads)
    assert float(optimizer.learning_rate.numpy()) == float(schedule(len(grads)).numpy())

    hp = hyperparameters(reference)
    hp["learning_rate"] = [float(schedule(t).numpy()) for t in range(len(grads))]
    assert len(set(hp["learning_rate"])) > 2
    for side, traj in (("keras", want), ("tf_bf16", got)):
        for i, (a, b) in enumerate(zip(traj, emulate(name, hp, w0s, grads, side))):
            assert_bits_equal(a[-1], b[-1], f"{case}: {side} vs its emulation, var {i}")
    assert_parity(name, kwargs, got, want, w0s, grads, hp, case)


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_schedule_in_fit_does_not_retrace_under_the_policy(name, rounding):
    """fit traces its train function once, or twice when the first trace creates
    the optimizer's variables (Keras builds the optimizer there and tf.function
    then traces again), as with the stock optimizer; never again as the rate
    changes."""
    tf_bf16.set_policy()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 4)), rng.standard_normal((32, 1))
    for make in (keras_optimizer, bf16_optimizer):
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([5, 9], [0.1, 0.01, 0.001])
        kwargs = {"rounding": rounding} if make is bf16_optimizer else {}
        optimizer = make(name, learning_rate=schedule, **kwargs)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=optimizer, loss="mse")
        calls = counting_update_step(optimizer)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)       # steps 0-3
        first_epoch = len(calls)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)       # steps 4-11: lr changes
        assert len(calls) == first_epoch, make
        assert int(optimizer.iterations.numpy()) == 12
        assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.001)
        # Beyond iterations and lr (and tf_bf16's seed, created with the optimizer).
        creates_variables = len([v for v in optimizer.variables
                                 if v is not getattr(optimizer, "rounding_seed", None)]) > 2
        expected_traces = 2 if creates_variables else 1
        assert first_epoch == expected_traces * len(model.trainable_variables), make


CLIP_CASES = [dict(clipnorm=0.5), dict(clipvalue=0.2), dict(global_clipnorm=0.5)]


@pytest.mark.parametrize("clip", CLIP_CASES, ids=lambda c: next(iter(c)))
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_gradient_clipping_matches_keras(name, clip):
    kwargs = dict(learning_rate=0.05, **clip)
    w0s, grads = make_problem(seed=11, steps=6)
    reference = keras_optimizer(name, **kwargs)
    want, _ = run_steps(reference, w0s, grads)
    got, _ = run_steps(bf16_optimizer(name, **kwargs), w0s, grads)
    unclipped, _ = run_steps(bf16_optimizer(name, learning_rate=0.05), w0s, grads)
    assert not np.array_equal(got[0][-1], unclipped[0][-1])   # the clipping was active
    # Clipping happens in Keras's base class, before update_step: the clipped
    # gradients are what both formulations see.
    clipped = [reference._clip_gradients([tf.constant(g) for g in step]) for step in grads]
    clipped = [[np.asarray(g) for g in step] for step in clipped]
    hp = hyperparameters(reference)
    for i, (a, b) in enumerate(zip(got, emulate(name, hp, w0s, clipped, "tf_bf16"))):
        assert_bits_equal(a[-1], b[-1], f"{name} {clip}: vs emulation with clipped gradients")
    assert_parity(name, kwargs, got, want, w0s, clipped, hp, f"{name} {clip}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_exclude_from_weight_decay(name, dtype):
    w0s, grads = make_problem(seed=13, steps=5, shapes=((6, 4), (4,), (3,)))

    def run(weight_decay, exclude):
        optimizer = bf16_optimizer(name, learning_rate=0.05, weight_decay=weight_decay)
        variables = [keras.Variable(w, dtype=dtype, name=n)
                     for w, n in zip(w0s, ("kernel", "bias", "scale"))]
        if exclude:
            optimizer.exclude_from_weight_decay(var_list=[variables[2]], var_names=["bias"])
        for step in grads:
            optimizer.apply_gradients([(tf.cast(g, dtype), v) for g, v in zip(step, variables)])
        return [v.numpy() for v in variables]

    decayed = run(0.3, exclude=True)
    plain = run(0.0 if name == "AdamW" else None, exclude=False)
    all_decayed = run(0.3, exclude=False)
    assert not np.array_equal(bits(decayed[0]), bits(plain[0]))     # kernel decays
    for i in (1, 2):   # excluded by name and by variable: exactly the undecayed update
        assert_bits_equal(decayed[i], plain[i], f"{name} {dtype}: excluded variable {i}")
        assert not np.array_equal(bits(all_decayed[i]), bits(plain[i]))
    assert_bits_equal(decayed[0], all_decayed[0], f"{name} {dtype}: kernel")
    if dtype == "float32":   # and the same selection as Keras's
        reference = keras_optimizer(name, learning_rate=0.05, weight_decay=0.3)
        variables = [keras.Variable(w, name=n) for w, n in zip(w0s, ("kernel", "bias", "scale"))]
        reference.exclude_from_weight_decay(var_list=[variables[2]], var_names=["bias"])
        for step in grads:
            reference.apply_gradients(zip([tf.constant(g) for g in step], variables))
        hp = hyperparameters(reference)
        for i, v in enumerate(variables):
            hp_i = dict(hp, weight_decay=hp["weight_decay"] if i == 0 else None)
            grads_i = [[step[i]] for step in grads]
            (keras_traj,) = emulate(name, hp_i, [w0s[i]], grads_i, "keras")
            assert_bits_equal(v.numpy(), keras_traj[-1], f"{name}: Keras, variable {i}")
            (bound,) = parity_bound(name, hp_i, [w0s[i]], grads_i, [keras_traj])
            assert np.all(np.abs(decayed[i].astype(np.float64) - keras_traj[-1]) <= bound)


@pytest.mark.parametrize("name", ["SGD", "Lion"])
def test_ema_float32_matches_keras_bitwise(name):
    """Keras: average = m * average + (1 - m) * var. tf_bf16 adds the difference
    (new - average) to the average; for float32 that is the same number when
    new - average is exact, which Sterbenz's lemma guarantees while the
    average and the weights stay within a factor 2 of each other (weights in
    [1, 2), small steps)."""
    rng = np.random.default_rng(17)
    w0s = [(1.25 + 0.5 * rng.random((33,))).astype(F32)]
    grads = [[rng.standard_normal(33).astype(F32)] for _ in range(12)]
    kwargs = dict(learning_rate=0.01, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5)
    reference = keras_optimizer(name, **kwargs)
    want, _ = run_steps(reference, w0s, grads)
    optimizer = bf16_optimizer(name, **kwargs)
    got, _ = run_steps(optimizer, w0s, grads)
    for t, (a, b) in enumerate(zip(got[0], want[0])):   # incl. the overwrites at steps 5, 10
        assert_bits_equal(a, b, f"{name}: weights after step {t}")
    assert_bits_equal(optimizer._model_variables_moving_average[0],
                      reference._model_variables_moving_average[0], f"{name}: average")


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_ema_averages_move_in_bf16(name, rounding):
    """The bf16 average tracks the float32 EMA of the (bf16) weights.

    The average is rounded stochastically (both for "stochastic" and
    "kahan"), so it is unbiased: E[a_t] is the float32 EMA of the weights.
    Each step adds an independent SR error of variance <= spacing^2 / 4,
    decayed by 0.99 per step: Var <= spacing^2 / 4 / (1 - 0.99^2), so the
    mean over n elements is within 5 * spacing / 2 / sqrt(0.0199 n).
    """
    n, steps = 512, 60
    w0, sign, grads = sign_consistent_problem(n=n, steps=steps, low=1.0, seed=19)
    optimizer = bf16_optimizer(name, learning_rate=0.01, rounding=rounding, use_ema=True)
    traj, variables = run_steps(optimizer, [w0], grads, "bfloat16")
    average = optimizer._model_variables_moving_average[0]
    assert average.dtype == "bfloat16"
    reference = np.array(traj[0][1], np.float64)          # first step: a copy
    for w in traj[0][2:]:
        reference = 0.99 * reference + 0.01 * w
    got = as_f32(average.value)
    moved = np.abs(reference - traj[0][1])
    assert np.median(moved) > 0.05                         # the average moved a lot
    assert np.count_nonzero(got != traj[0][1]) > 0.95 * n
    spacing = bf16_spacing(np.maximum(np.abs(reference), np.abs(got)))
    bound = 5 * np.mean(spacing) / 2 / math.sqrt((1 - 0.99**2) * n)
    assert abs(np.mean(got - reference)) <= bound


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_gradient_accumulation_matches_keras(name):
    kwargs = dict(learning_rate=0.05, gradient_accumulation_steps=3)
    w0s, grads = make_problem(seed=23, steps=9)
    reference = keras_optimizer(name, **kwargs)
    want, _ = run_steps(reference, w0s, grads)
    got, _ = run_steps(bf16_optimizer(name, **kwargs), w0s, grads)
    for t in (1, 2, 4, 5, 7, 8):     # between updates nothing moves
        for a in got:
            assert_bits_equal(a[t], a[t - 1], f"{name}: step {t}")
    # Keras applies (g_3 + (g_1 + g_2)) / 3 at iterations 2, 5, 8 (0-based); its
    # `iterations` property (Adam's bias correction) counts updates then: 0, 1, 2.
    averaged = [[np.asarray((tf.constant(grads[k + 2][i])
                             + (tf.constant(grads[k][i]) + tf.constant(grads[k + 1][i]))) / 3)
                 for i in range(len(w0s))] for k in (0, 3, 6)]
    hp = dict(hyperparameters(reference), iterations=[0, 1, 2])
    updates = lambda traj: [[a[0], a[3], a[6], a[9]] for a in traj]  # noqa: E731
    for side, traj in (("keras", want), ("tf_bf16", got)):
        for i, (a, b) in enumerate(zip(updates(traj), emulate(name, hp, w0s, averaged, side))):
            assert_bits_equal(a[-1], b[-1], f"{name}: {side} vs its emulation, var {i}")
    assert_parity(name, kwargs, updates(got), updates(want), w0s, averaged, hp, name)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_gradient_accumulators_are_bf16(rounding):
    optimizer = bf16_optimizer("SGD", learning_rate=0.1, rounding=rounding,
                               gradient_accumulation_steps=4)
    w0, _, grads = sign_consistent_problem(n=64, steps=8, low=1.0)
    traj, variables = run_steps(optimizer, [w0], grads, "bfloat16")
    (accumulator,) = optimizer._accumulated_gradients
    assert accumulator.dtype == "bfloat16"
    for t in range(1, 9):
        changed = not np.array_equal(traj[0][t], traj[0][t - 1])
        assert changed == (t % 4 == 0), t
    assert np.all(as_f32(accumulator.value) == 0)          # reset after the update
    # The update applies the mean of 4 gradients: within bf16 rounding of float32.
    ref, _ = run_steps(bf16_optimizer("SGD", learning_rate=0.1, gradient_accumulation_steps=4),
                       [w0], grads, "float32")
    spacing = bf16_spacing(np.maximum(np.abs(ref[0][-1]), np.abs(traj[0][-1])))
    assert np.all(np.abs(traj[0][-1] - ref[0][-1]) <= 2 * spacing)


EMBEDDING_CASES = {
    "SGD": {}, "SGD_momentum": {"momentum": 0.9}, "Adam": {}, "AdamW": {"weight_decay": 0.1},
    "Lion": {},
}


def embedding_gradients(dtype, ids_per_step, vocab=11, dim=3, seed=29):
    """An Embedding's initial table and its IndexedSlices gradients for given ids."""
    layer = keras.layers.Embedding(vocab, dim, dtype=dtype)
    layer.build((None,))
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, dim)).astype(F32)
    layer.embeddings.assign(tf.cast(table, dtype))
    targets = [rng.standard_normal((len(ids), dim)).astype(F32) for ids in ids_per_step]
    grads = []
    for ids, target in zip(ids_per_step, targets):
        with tf.GradientTape() as tape:
            out = tf.cast(layer(tf.constant(ids)), tf.float32)
            loss = tf.reduce_sum(out * target)      # gradient rows = target rows
        (grad,) = tape.gradient(loss, [layer.embeddings.value])
        assert isinstance(grad, tf.IndexedSlices)
        grads.append(grad)
    return as_f32(layer.embeddings.value), grads


def apply_sparse(optimizer, table, grads, dtype, trajectory=False):
    """The table after the steps (or its whole trajectory)."""
    variable = keras.Variable(tf.cast(table, dtype), dtype=dtype, name="embeddings")
    traj = [as_f32(variable.value)]
    for g in grads:
        optimizer.apply_gradients([(g, variable)])
        traj.append(as_f32(variable.value))
    return traj if trajectory else traj[-1]


@pytest.mark.parametrize("duplicates", [False, True], ids=["unique", "duplicate_ids"])
@pytest.mark.parametrize("case", sorted(EMBEDDING_CASES))
def test_sparse_embedding_gradients_float32(case, duplicates):
    name = case.split("_")[0]
    kwargs = dict(learning_rate=0.05, **EMBEDDING_CASES[case])
    ids = [[1, 4, 7], [2, 4, 9], [0, 1, 10]]
    if duplicates:
        ids = [[1, 4, 1, 7, 1], [2, 4, 9, 4], [0, 1, 10]]
    table, grads = embedding_gradients("float32", ids)
    want = apply_sparse(keras_optimizer(name, **kwargs), table, grads, "float32", True)
    got = apply_sparse(bf16_optimizer(name, **kwargs), table, grads, "float32", True)
    dense = [[np.asarray(tf.convert_to_tensor(g))] for g in grads]
    hp = hyperparameters(keras_optimizer(name, **kwargs))
    if name == "SGD" and not kwargs.get("momentum"):
        got, want = got[-1], want[-1]
        untouched = sorted(set(range(11)) - set(sum(ids, [])))
        assert_bits_equal(got[untouched], table[untouched], "rows without gradient")
        if not duplicates:
            assert_bits_equal(got, want, f"{case}: sparse SGD vs Keras")
            return
        # Keras scatter-subtracts lr * g per occurrence; tf_bf16 sums the
        # duplicates first (in float32) and subtracts once: the same sum, with
        # at most (occurrences + 1) roundings of half an ulp of the row's
        # magnitude on each side.
        scale = np.maximum(np.abs(table), np.abs(want)) + 0.05 * sum(np.abs(d[0]) for d in dense)
        assert np.all(np.abs(got - want) <= 8 * np.spacing(scale.astype(F32)))
        return
    if duplicates and name in ("Adam", "AdamW"):
        # Keras squares IndexedSlices row by row (ops.square keeps them sparse)
        # and only then sums duplicate rows: its v gets sum(g_k^2) instead of
        # (sum g_k)^2, unlike its own dense update. tf_bf16 densifies first, so
        # it follows Keras's update of the dense gradient.
        keras_dense = apply_sparse(keras_optimizer(name, **kwargs), table,
                                   [tf.convert_to_tensor(g) for g in grads], "float32", True)
        assert np.max(np.abs(want[-1] - keras_dense[-1])) > 1e-2
        want = keras_dense
    if duplicates and name == "SGD":
        # Keras multiplies the IndexedSlices by lr occurrence by occurrence
        # (ops.multiply keeps them sparse) and sums duplicate rows only when
        # subtracting from the momentum; tf_bf16 densifies first. So tf_bf16
        # equals Keras's update of the dense gradient bit for bit, and Keras's
        # sparse update within the rounding bound of that reordering.
        keras_dense = apply_sparse(keras_optimizer(name, **kwargs), table,
                                   [tf.convert_to_tensor(g) for g in grads], "float32", True)
        assert_bits_equal(got[-1], keras_dense[-1], f"{case}: vs Keras, dense gradients")
        for a, b, bound in zip([got], [want], parity_bound(name, hp, [table], dense, [want])):
            assert np.all(np.abs(a[-1].astype(np.float64) - b[-1]) <= bound), case
        return
    # Densified (Keras's math on IndexedSlices densifies): the dense formulas.
    assert_parity(name, kwargs, [got], [want], [table], dense, hp, case)
    (emulated,) = emulate(name, hp, [table], dense, "tf_bf16")
    assert_bits_equal(got[-1], emulated[-1], f"{case}: vs emulation with dense gradients")


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_sparse_gradients_with_weight_decay_decay_every_row(name):
    """Keras decays the whole variable before the (sparse) update, rows without
    a gradient included; so must tf_bf16, which folds the decay into the update."""
    kwargs = dict(learning_rate=0.05, weight_decay=0.1)
    ids = [[1, 4, 7], [2, 4, 9]]
    table, grads = embedding_gradients("float32", ids)
    want = apply_sparse(keras_optimizer(name, **kwargs), table, grads, "float32", True)
    got = apply_sparse(bf16_optimizer(name, **kwargs), table, grads, "float32", True)
    untouched = [0, 3, 5, 6, 8, 10]    # decayed twice, never updated
    assert np.all(np.abs(want[-1][untouched]) < np.abs(table[untouched]))
    dense = [[np.asarray(tf.convert_to_tensor(g))] for g in grads]
    hp = hyperparameters(keras_optimizer(name, **kwargs))
    assert_parity(name, kwargs, [got], [want], [table], dense, hp, f"{name} sparse + decay")


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_sparse_embedding_gradients_bf16(rounding):
    """Plain SGD on a bf16 table updates only the rows looked up, each duplicate
    id's gradient summed once, with the optimizer's rounding."""
    ids = [[1, 4, 1, 7, 1], [2, 4, 9, 4]] * 3
    table, grads = embedding_gradients("bfloat16", ids)
    got = apply_sparse(bf16_optimizer("SGD", learning_rate=0.01, rounding=rounding),
                       table, grads, "bfloat16")
    untouched = [0, 3, 5, 6, 8, 10]
    assert_bits_equal(got[untouched], table[untouched], "rows without gradient")
    touched = [1, 2, 4, 7, 9]
    assert np.all(np.any(got[touched] != table[touched], axis=1))
    # Against the float32 update of the same table (bf16 gradients are exact in float32).
    want = apply_sparse(bf16_optimizer("SGD", learning_rate=0.01), table, grads, "float32")
    spacing = bf16_spacing(np.maximum(np.abs(want), np.abs(table)))
    assert np.all(np.abs(got - want) <= len(ids) * spacing / 2 + spacing)


# ---------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_config_round_trip_keeps_rounding_and_seed(name, rounding):
    optimizer = bf16_optimizer(name, learning_rate=0.02, rounding=rounding, seed=987654,
                               clipnorm=1.5, use_ema=True)
    config = optimizer.get_config()
    assert config["rounding"] == rounding and config["seed"] == 987654
    clone = type(optimizer).from_config(config)
    assert type(clone) is type(optimizer)
    assert clone.rounding == rounding and clone.seed == 987654
    assert clone.get_config() == config
    # Through Keras's registry (registered as "tf_bf16>Name").
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is type(optimizer)
    assert restored.get_config() == config
    stock_keys = set(keras_optimizer(name).get_config())
    assert set(config) == stock_keys | {"rounding", "seed"}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_seed_none_draws_a_seed_that_is_saved(name):
    optimizers = [getattr(bf16_optimizers, name)(seed=None) for _ in range(4)]
    seeds = [o.seed for o in optimizers]
    assert all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    assert len(set(seeds)) > 1            # drawn, not a constant (4 draws from 2^31)
    for o in optimizers:
        config = o.get_config()
        assert config["seed"] == o.seed
        assert type(o).from_config(config).seed == o.seed
    default = getattr(bf16_optimizers, name)()
    assert default.rounding == "kahan" and isinstance(default.seed, int)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_invalid_rounding_and_seed_are_refused(name):
    with pytest.raises(ValueError, match="rounding"):
        getattr(bf16_optimizers, name)(rounding="truncate")
    with pytest.raises(ValueError, match="seed"):
        getattr(bf16_optimizers, name)(seed=1.5)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_same_seed_same_bits_other_seed_other_bits(name):
    w0, _, grads = sign_consistent_problem(n=256, steps=5, low=1.0)
    run = lambda seed: run_steps(  # noqa: E731
        bf16_optimizer(name, learning_rate=1e-3, rounding="stochastic", seed=seed),
        [w0], grads, "bfloat16")[0][0][-1]
    a, b, c = run(5), run(5), run(6)
    assert_bits_equal(a, b, "same seed")
    assert not np.array_equal(bits(a), bits(c))


# ---------------------------------------------------------------------------
# float16 / float64 variables (outside the policy): Keras's own update


def run_other_dtype(make, name, dtype, kwargs, steps=4):
    rng = np.random.default_rng(31)
    w0 = rng.standard_normal(8)
    variable = keras.Variable(w0, dtype=dtype)
    optimizer = make(name, learning_rate=0.1, **kwargs)
    for _ in range(steps):
        optimizer.apply_gradients([(tf.constant(rng.standard_normal(8), dtype), variable)])
    return variable.numpy()


OTHER_DTYPE_CASES = [("SGD", {}), ("SGD", {"momentum": 0.9, "nesterov": True}),
                     ("SGD", {"weight_decay": 0.1}), ("Adam", {"amsgrad": True}),
                     ("AdamW", {}), ("Lion", {"weight_decay": 0.1})]


@pytest.mark.parametrize("dtype", ["float16", "float64"])
@pytest.mark.parametrize("name,kwargs", OTHER_DTYPE_CASES, ids=lambda c: str(c))
def test_float16_and_float64_variables_get_keras_update(name, kwargs, dtype):
    want = run_other_dtype(keras_optimizer, name, dtype, kwargs)
    got = run_other_dtype(bf16_optimizer, name, dtype, kwargs)
    assert got.dtype == want.dtype == np.dtype(dtype)
    assert_bits_equal(got, want, f"{name} {kwargs} {dtype}")


@pytest.mark.parametrize("dtype", ["float16", "float64"])
@pytest.mark.parametrize("kwargs", [{"use_ema": True}, {"gradient_accumulation_steps": 2}],
                         ids=["ema", "accumulation"])
def test_float16_and_float64_variables_with_ema_or_accumulation(kwargs, dtype):
    want = run_other_dtype(keras_optimizer, "SGD", dtype, kwargs)
    got = run_other_dtype(bf16_optimizer, "SGD", dtype, kwargs)
    assert_bits_equal(got, want, f"{kwargs} {dtype}")
