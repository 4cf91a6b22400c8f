"""Small-increment behaviour of the bf16 roundings: Kahan, stochastic, nearest.

Problems where every single update is below half a bf16 ulp, so that round to
nearest stalls, and the float32 result is known: a long accumulation
(rounded_assign_add), plain SGD and Adam on quadratics. Every bound below is
derived in a comment from the rounding specification (docs/rounding.md) and
the problem; stochastic results are checked at 5 standard errors of a mean
over independent elements (distinct flat indices draw independent bits:
tests/test_stochastic_rounding.py), with fixed seeds and no retries.

Notation: u_bf16 = 2^-8 is bf16's unit roundoff (8 significant bits), so
|RNE(x) - x| <= 2^-8 |x|; spacing(x) is the gap between the bf16 neighbours of x.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_bf16 import ROUNDINGS
from tf_bf16 import ops

from conftest import assert_bits_equal, bits

N_SIGMA = 5.0
U_BF16 = 2.0**-8
U_F32 = 2.0**-24


def rne_bf16(x):
    """float32 -> nearest bf16 (ties to even), as float64."""
    return float(tf.cast(tf.cast(tf.constant(x, tf.float32), tf.bfloat16), tf.float64))


def bf16_spacing_at(x):
    """Gap between consecutive bf16 values in the binade of |x| (a normal number)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


def new_state(value, dtype, n):
    return tf.Variable(tf.fill([n], tf.constant(value, tf.float32)) if dtype == tf.float32
                       else tf.cast(tf.fill([n], tf.constant(value, tf.float32)), dtype))


def compensation_for(dtype, rounding, n):
    if rounding == "kahan" and dtype == tf.bfloat16:
        return tf.Variable(tf.zeros([n], tf.bfloat16))
    return None


# ---------------------------------------------------------------------------
# 1. 10,000 increments of 1e-3 onto 1.0.

K_ACC = 10_000
D_ACC = np.float32(1e-3)
N_ACC = 1024   # independent elements (used by the stochastic mean)
SEED = 2718


def float32_sum():
    """The same 10,000 float32 additions, in numpy (strict float32)."""
    s = np.float32(1.0)
    for _ in range(K_ACC):
        s = np.float32(s + D_ACC)
    return s


S32 = float32_sum()          # 11.000825 (float32 accumulation error included)
_ACC_CACHE = {}


def accumulate(device, dtype, rounding):
    """(weight, compensation) after K_ACC rounded_assign_add calls of D_ACC.

    One tf.function with a tf.range loop (graph while-loop): ~0.1-0.5 s for
    10,000 steps here, against several seconds for 10,000 eager calls.
    """
    key = (device, dtype, rounding)
    if key not in _ACC_CACHE:
        w = new_state(1.0, dtype, N_ACC)
        c = compensation_for(dtype, rounding, N_ACC)
        delta = tf.fill([N_ACC], tf.constant(D_ACC))

        @tf.function
        def loop():
            for k in tf.range(K_ACC, dtype=tf.int64):
                ops.rounded_assign_add(w, delta, rounding=rounding, compensation=c,
                                       seed=SEED, step=k, var_id=0)

        loop()
        _ACC_CACHE[key] = (w.numpy(), None if c is None else c.numpy())
    return _ACC_CACHE[key]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_accumulation_float32_variable_is_the_float32_sum(device, rounding):
    """float32 variables: exact float32 adds whatever the rounding, bit for bit."""
    w, _ = accumulate(device, tf.float32, rounding)
    assert_bits_equal(w, np.full(N_ACC, S32, np.float32), f"float32, {rounding}")


def test_accumulation_nearest_stalls_at_one(device):
    # 1 + 1e-3 lies below the midpoint 1 + 2^-8 between 1 and the next bf16
    # 1 + 2^-7, so every step rounds back to exactly 1.
    w, _ = accumulate(device, tf.bfloat16, "nearest")
    assert (bits(w) == 0x3F80).all(), np.unique(w.astype(np.float32))


def test_accumulation_kahan_weight_reaches_float32_sum(device):
    # The weight is deterministic (no random bits): all elements agree.
    w, c = accumulate(device, tf.bfloat16, "kahan")
    assert (bits(w) == bits(w)[0]).all() and (bits(c) == bits(c)[0]).all()
    w0 = float(w[0])
    # Tolerance. docs/rounding.md section 4 rounds each increment to bf16
    # first (u = RNE(1e-3) = 0.00099945...), so the best the algorithm can
    # reach is T = 1 + K u, which is K |1e-3 - u| = 0.0055 from the exact sum.
    # A bf16 weight is at best the bf16 value nearest to T (half a spacing),
    # and the compensation may still hold up to half a spacing that has not
    # reached the weight: one spacing at S32 (2^-4 = 0.0625 in [8, 16)).
    u = rne_bf16(D_ACC)
    tol = bf16_spacing_at(S32) + K_ACC * abs(float(D_ACC) - u)
    assert abs(w0 - float(S32)) <= tol, (
        f"kahan weight {w0} vs float32 sum {S32}: |diff| {abs(w0 - float(S32)):.5f} > {tol:.5f}")
    assert w0 > 10.0  # and not stalled like nearest


def test_accumulation_kahan_follows_the_spec_emulated_independently(device):
    """docs/rounding.md section 4, emulated with ml_dtypes' bfloat16 (an
    implementation independent of TensorFlow and of the kernels), gives the same
    weight and compensation bit for bit after all K steps.

    The compensated pair w - c is NOT within half a bf16 spacing of the float32
    sum here (10.9322 vs 11.0008): Kahan summation's error bound has an
    n*eps^2 term (eps = 2^-8, n = 10^4), and y = RNE(u - c) rounds the same way
    each time c cycles through the same values. docs/rounding.md ("Limits")
    records this; the weight itself is checked against the sum above.
    """
    import ml_dtypes

    def rne(x):
        return np.float32(np.float32(x).astype(ml_dtypes.bfloat16))

    w_ref, c_ref = np.float32(1.0), np.float32(0.0)
    for _ in range(K_ACC):
        u = rne(D_ACC)
        y = rne(u - c_ref)
        s = rne(w_ref + y)
        c_ref = rne(rne(s - w_ref) - y)
        w_ref = s
    w, c = accumulate(device, tf.bfloat16, "kahan")
    assert_bits_equal(w, np.full(N_ACC, w_ref, np.float32).astype(ml_dtypes.bfloat16), "w")
    assert_bits_equal(c, np.full(N_ACC, c_ref, np.float32).astype(ml_dtypes.bfloat16), "c")


def test_accumulation_stochastic_is_unbiased(device):
    w, _ = accumulate(device, tf.bfloat16, "stochastic")
    w = w.astype(np.float64)
    d = float(D_ACC)
    # Each step w_{k+1} = SR(v_k), v_k = fl32(w_k + d), so w_K = 1 + sum d'_k +
    # sum eps_k with d'_k = v_k - w_k and eps_k = SR(v_k) - v_k, a martingale
    # difference (E[eps_k | past] = 0).
    # Variance: w_k >= 1 is a bf16 value and d < spacing(w_k) (>= 2^-7), so the
    # neighbours of v_k are w_k and w_k + spacing(w_k), and
    #   Var(eps_k | w_k) = d'_k (spacing - d'_k) <= d'_k * 2^-7 * w_k
    # (spacing(w) <= 2^-7 w). With d'_k <= d (1 + 2^-7) (float32 error of
    # w + d is at most 2^-24 (w + d), below 2^-7 d while w < 131) and
    # E[w_k] <= 1 + k d (1 + 2^-7):
    #   Var(w_K) <= sum_k d (1 + 2^-7) 2^-7 (1 + k d (1 + 2^-7))   (~0.47, SD ~0.69)
    # and the mean of N_ACC independent elements has SE = sqrt(Var / N_ACC).
    dp = d * (1 + 2.0**-7)
    k = np.arange(K_ACC, dtype=np.float64)
    var = float(np.sum(dp * 2.0**-7 * (1 + k * dp)))
    se = math.sqrt(var / N_ACC)
    # Bias: E[w_K] - (1 + K d) = sum E[d'_k - d], |d'_k - d| <= 2^-24 (w_k + d);
    # and S32 itself differs from 1 + K d by its known float32 error.
    bias = float(np.sum(U_F32 * (1 + k * dp + d))) + abs(float(S32) - (1 + K_ACC * d))
    mean = w.mean()
    assert abs(mean - float(S32)) <= N_SIGMA * se + bias, (
        f"stochastic mean {mean} vs float32 sum {S32}: |diff| {abs(mean - float(S32)):.5f}, "
        f"5 SE = {N_SIGMA * se:.5f}, bias bound {bias:.5f}")
    # The elements took different random paths (rounding noise, not a stall).
    assert np.unique(w).size > 1


# ---------------------------------------------------------------------------
# 2. SGD on f(w) = w^2 / 2 (gradient w), from w = 1, lr = 1e-3, 1000 steps.
#
# Each step moves w by lr * w <= 1e-3, below half the bf16 gap below 1
# (2^-9 = 0.00195), so nearest rounding stalls at 1 while float32 reaches
# (1 - lr)^K = 0.3677.

SGD_LR = 1e-3
SGD_K = 1000
N_OPT = 1024
_SGD_CACHE = {}


def run_sgd(device, dtype, rounding):
    key = (device, dtype, rounding)
    if key not in _SGD_CACHE:
        w = new_state(1.0, dtype, N_OPT)
        c = compensation_for(dtype, rounding, N_OPT)

        @tf.function
        def loop():
            for k in tf.range(SGD_K, dtype=tf.int64):
                g = tf.cast(w.read_value(), tf.float32)
                ops.apply_sgd(w, g, SGD_LR, rounding=rounding, compensation=c, seed=SEED,
                              step=k, var_id=1)

        loop()
        _SGD_CACHE[key] = w.numpy()
    return _SGD_CACHE[key]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_sgd_small_steps_on_quadratic(device, rounding):
    f_k = run_sgd(device, tf.float32, "nearest")
    assert (f_k == f_k[0]).all()
    f_k = float(f_k[0])
    # The float32 trajectory itself: (1 - lr)^K up to K * 2^-22 of float32 error.
    assert abs(f_k - (1 - SGD_LR) ** SGD_K) <= SGD_K * 2.0**-22
    w = run_sgd(device, tf.bfloat16, rounding).astype(np.float64)
    lr, K = SGD_LR, SGD_K
    # Both runs do the same float32 operations, g * lr and w - step, each with
    # relative error <= 2^-24; with w <= 1 and the contraction (1 - lr), their
    # expectations differ by at most K * 2 * 2 * 2^-24 = K * 2^-22 (2.4e-4).
    f32_slack = K * 2.0**-22
    if rounding == "nearest":
        assert (bits(w.astype(tf.bfloat16.as_numpy_dtype)) == 0x3F80).all(), np.unique(w)
        return
    if rounding == "stochastic":
        # w_{k+1} = (1 - lr) w_k + eps_k with E[eps_k | past] = 0 (float32
        # errors aside), so E[w_K] = f_K and
        #   Var(w_K) = sum_k (1 - lr)^(2 (K - 1 - k)) E[Var(eps_k | w_k)].
        # The pre-rounding value v = w_k - lr w_k lies between w_k and the bf16
        # below it (lr w_k < 2^-8 w_k <= the gap below w_k), so
        #   Var(eps_k | w_k) = (v - lo)(w_k - v) <= gap * lr w_k <= 2^-8 lr
        # (0 < w_k <= 1, gap <= 2^-8). The mean over N_OPT independent elements
        # has SE <= sqrt(Var / N_OPT) (~0.0013).
        j = np.arange(K, dtype=np.float64)
        var = float(np.sum((1 - lr) ** (2 * j) * U_BF16 * lr))
        se = math.sqrt(var / N_OPT)
        tol = N_SIGMA * se + f32_slack
        mean = w.mean()
        assert abs(mean - f_k) <= tol, (
            f"SGD stochastic mean {mean} vs float32 {f_k}: |diff| {abs(mean - f_k):.5f} > {tol:.5f}")
        assert w.std() > 0  # per-element noise, not a deterministic path
        return
    # Kahan: deterministic, so every element is the same.
    assert (w == w[0]).all()
    # x_k = w_k - c_k follows (spec section 4; s - w and the compensation are
    # exact, Fast2Sum with |y| << |w|):
    #   x_{k+1} = x_k + d_k + (RNE(d_k) - d_k) + delta_k,  d_k = -lr w_k,
    # delta_k the rounding error of y = RNE(RNE(d_k) - c_k). With the
    # gradient taken at w_k = x_k + c_k, the error e_k = x_k - f_k obeys
    #   e_{k+1} = (1 - lr) e_k + xi_k,
    #   |xi_k| <= lr |c_k| + 2^-8 |d_k| + 2^-8 (|d_k| (1 + 2^-8) + |c_k|),
    # |d_k| <= lr, |c_k| <= c_max = 2^-8 (half the gap above s <= 1). The
    # contraction gives |e_K| <= sum |xi_k|, and |w_K - f_K| <= |e_K| + c_max.
    c_max = U_BF16
    xi = lr * c_max + U_BF16 * lr + U_BF16 * (lr * (1 + U_BF16) + c_max)
    tol = K * xi + c_max + f32_slack  # ~0.031, against a displacement of 0.63
    assert abs(w[0] - f_k) <= tol, (
        f"SGD kahan {w[0]} vs float32 {f_k}: |diff| {abs(w[0] - f_k):.5f} > {tol:.5f}")


# ---------------------------------------------------------------------------
# 3. Adam on f(w) = (w - t)^2 / 2, t = -100, from w = 1, lr = 5e-4, 800 steps.
#
# The gradient g = w + 100 stays in [100, 101] while w is in [0, 1]. Adam
# starts warm (m = 101, v = RNE(101^2) = 10176, step >= 10^4 so that the bias
# corrections are 1 to float32 precision): the state a checkpointed run has.
# Each step moves w by lr * rho, rho = m' / sqrt(v') in [100/101.2, 101/99.92]
# (m' in [100, 101], v' in [9984, 10240]: convex combinations of values in
# those ranges, and SR keeps stored values between their bf16 neighbours), so
# |step| <= 1.0108 lr = 5.05e-4 < 2^-9, half the gap below 1: nearest stalls,
# float32 moves by ~0.4.

ADAM_LR = 5e-4
ADAM_K = 800
ADAM_T = -100.0
ADAM_STEP0 = 10_000
RHO_MAX = 101.0 / math.sqrt(9984.0)
_ADAM_CACHE = {}


def run_adam(device, dtype, rounding):
    key = (device, dtype, rounding)
    if key not in _ADAM_CACHE:
        w = new_state(1.0, dtype, N_OPT)
        m = new_state(101.0, dtype, N_OPT)
        v = new_state(rne_bf16(101.0**2), dtype, N_OPT)
        c = compensation_for(dtype, rounding, N_OPT)

        @tf.function
        def loop():
            for k in tf.range(ADAM_K, dtype=tf.int64):
                g = tf.cast(w.read_value(), tf.float32) - ADAM_T
                ops.apply_adam(w, g, m, v, ADAM_LR, step=ADAM_STEP0 + k, rounding=rounding,
                               compensation=c, seed=SEED, var_id=2)

        loop()
        _ADAM_CACHE[key] = (w.numpy(), m.numpy(), v.numpy())
    return _ADAM_CACHE[key]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_adam_small_steps_on_quadratic(device, rounding):
    f_w, f_m, f_v = run_adam(device, tf.float32, "nearest")
    f_k = float(f_w[0])
    displacement = 1.0 - f_k
    # float32 moves by K lr rho, rho in [100 / sqrt(10240), RHO_MAX] (ranges above).
    assert ADAM_K * ADAM_LR * 100 / math.sqrt(10240) <= displacement <= ADAM_K * ADAM_LR * RHO_MAX
    w, m, v = (a.astype(np.float64) for a in run_adam(device, tf.bfloat16, rounding))
    lr, K = ADAM_LR, ADAM_K
    if rounding == "nearest":
        assert (bits(w.astype(tf.bfloat16.as_numpy_dtype)) == 0x3F80).all(), np.unique(w)
        return
    # The ranges the derivation relies on (m, v stay between bf16 neighbours
    # of convex combinations of values in range; w decreases from 1).
    assert (m >= 100).all() and (m <= 101).all() and (v >= 9984).all() and (v <= 10240).all()
    assert (w > 0).all() and (w < 1).all()
    # Both roundings store m and v stochastically (spec section 5), so the
    # elements differ; they are independent (distinct indices), and the
    # sample SD / sqrt(N) estimates the standard error of their mean (N = 1024:
    # the estimate is itself good to ~2%).
    mean, se = w.mean(), w.std(ddof=1) / math.sqrt(N_OPT)
    # Bias of the mean relative to float32:
    # - m' and the weight rounding enter linearly and are unbiased; rho is
    #   convex in the stored v only (through 1/sqrt(v)). With eta the relative
    #   SR noise of v: Var(eta) <= sum_j beta2^(2j) inc * spacing / v^2, with
    #   inc = 0.001 |g^2 - v| <= 0.24, spacing = 64, v >= 9984:
    #   <= 500.25 * 0.24 * 64 / 9984^2 = 7.7e-5; 1 + eta >= 9984/10240 and the
    #   Taylor remainder of (1 + eta)^(-1/2) gives a Jensen gap <= (3/8) *
    #   (9984/10240)^(-5/2) Var(eta) = 0.41 Var(eta), relative to each step.
    # - float32 arithmetic of the two runs: <= K * 2^-22 + 2^-20 * displacement.
    # - The weight noise reaches g = w + 100 only at relative size
    #   (SD(w) / 100)^2 < 1e-6: neglected (covered by the terms above many times).
    var_eta = 500.25 * 0.24 * 64 / 9984.0**2
    jensen = 0.41 * var_eta * displacement * RHO_MAX
    f32_slack = K * 2.0**-22 + 2.0**-20 * displacement
    tol = N_SIGMA * se + jensen + f32_slack
    if rounding == "kahan":
        # Per element, against an exact-weight run with the same moment noise,
        # as for SGD but without contraction (Adam's step does not depend on
        # the weight's error except through g, relative effect <= 2 c_max / 100
        # per step): |xi_k| <= 2^-8 d + 2^-8 (d (1 + 2^-8) + c_max)
        # + 2 d c_max / 100, d = RHO_MAX lr, plus c_max at the end.
        c_max = U_BF16
        d = RHO_MAX * lr
        xi = U_BF16 * d + U_BF16 * (d * (1 + U_BF16) + c_max) + 2 * d * c_max / 100
        tol += K * xi + c_max  # ~0.02 against a displacement of 0.4
    assert abs(mean - f_k) <= tol, (
        f"Adam {rounding} mean {mean} vs float32 {f_k}: |diff| {abs(mean - f_k):.5f} > "
        f"{tol:.5f} (5 SE = {N_SIGMA * se:.5f})")


# ---------------------------------------------------------------------------
# 4. float32 variables: the rounding argument has no effect.

N_F32 = 4096


def _f32_states(rng, names, shape):
    return {k: tf.Variable(rng.standard_normal(shape).astype(np.float32) *
                           (1.0 if k in ("var", "accum", "m") else 0.0) +
                           (rng.uniform(0.1, 1.0, shape).astype(np.float32)
                            if k in ("v", "vhat") else 0.0))
            for k in names}


def _f32_update(kind, state, grads, rounding, s):
    common = dict(rounding=rounding, seed=77, var_id=5)
    if kind == "assign_add":
        ops.rounded_assign_add(state["var"], grads[s] * 1e-3, step=s, **common)
    elif kind.startswith("sgd"):
        grad = grads[s]
        if kind == "sgd_sparse":
            grad = tf.IndexedSlices(tf.reshape(grad, [-1, 16])[:64],
                                    tf.constant([3, 1, 3, 0] * 16, tf.int64))
        ops.apply_sgd(state["var"], grad, 0.05, momentum=0.9, accumulator=state["accum"],
                      nesterov=True, weight_decay=0.01, step=s, **common)
    else:
        grad = grads[s]
        if kind == "adam_sparse":
            grad = tf.IndexedSlices(tf.reshape(grad, [-1, 16])[:64],
                                    tf.constant([5, 2, 5, 7] * 16, tf.int64))
        ops.apply_adam(state["var"], grad, state["m"], state["v"], 0.01, vhat=state["vhat"],
                       weight_decay=0.01, step=s, **common)


@pytest.mark.parametrize("kind", ["assign_add", "sgd", "sgd_sparse", "adam", "adam_sparse"])
def test_rounding_has_no_effect_on_float32_variables(device, kind):
    names = {"assign_add": ["var"], "sgd": ["var", "accum"], "sgd_sparse": ["var", "accum"],
             "adam": ["var", "m", "v", "vhat"], "adam_sparse": ["var", "m", "v", "vhat"]}[kind]
    shape = [N_F32 // 16, 16] if kind.endswith("sparse") else [N_F32]
    grads = [tf.constant(np.random.default_rng(100 + s).standard_normal(shape).astype(
        np.float32)) for s in range(3)]
    results = {}
    for rounding in ROUNDINGS:
        state = _f32_states(np.random.default_rng(1), names, shape)  # same start each time
        before = {k: v.numpy().copy() for k, v in state.items()}
        for s in range(3):
            _f32_update(kind, state, grads, rounding, s)
        results[rounding] = {k: v.numpy() for k, v in state.items()}
        assert any(not np.array_equal(before[k], results[rounding][k]) for k in names)
    for rounding in ("stochastic", "kahan"):
        for k in names:
            assert_bits_equal(results[rounding][k], results["nearest"][k],
                              f"{kind} {k}: {rounding} vs nearest")
