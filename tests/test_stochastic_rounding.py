"""Statistical properties of tf_bf16's stochastic rounding (SR).

Specification: docs/rounding.md, sections 2 and 3. For float32 x with bit
pattern u, SR(x) = (u + r) >> 16 with r a 16-bit draw from a counter-based hash
of (seed, step, var_id, flat element index): the element's hash chain
h0 = Mix32(Mix32(i ^ block_key)), h1 = Mix32(h0 ^ C) gives four draws
d0, d1, d2, d3 (the halves of h0 and h1), taken in order by the tensors one
call rounds stochastically (the weight, then the optimizer slots). So:

- SR(x) is the truncation `lo = u >> 16` or the next bf16 away from zero
  `hi = lo + 1` (sign-magnitude encoding), and it is `hi` exactly when
  r >= 2^16 - l, l = u & 0xFFFF, i.e. with probability p = l / 2^16;
- E[SR(x)] = lo + p * (hi - lo) = x.

Every test uses FIXED seeds and runs once: no retries, no tuned thresholds.
Each statistical threshold is derived in a comment next to it. The generic
bound is "5 standard errors": for a statistic that is (close to) normal under
the hypothesis being tested, a two-sided 5-sigma excursion has probability
5.7e-7, so a failure is a defect, not bad luck. A chi-square test uses the
exact quantile 1 - 1e-6 of its distribution instead.

The random bits are observed through the kernels (round-up indicators of
values whose pre-rounding float32 value is known; d0 and d1 read back exactly
by bisection), except in section 4's tests of d2 and d3 and of the joint
distribution of an element's draws, which take the draws from
tf_bf16.reference, after checking that the kernels' d0 and d1 are the
reference's bit for bit (the bit-identity suites check d2 and d3 through
Adam's slots).
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tf_bf16 import ops
from tf_bf16 import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from conftest import assert_bits_equal, bits

N_SIGMA = 5.0

# ---------------------------------------------------------------------------
# Helpers: bf16 neighbours of float32 values, observation of round-ups.


def f32_from_bits(u):
    return np.asarray(u, np.uint32).view(np.float32)


def bf16_bits_to_f64(b):
    """float64 values of bf16 bit patterns (uint16); NaN patterns give NaN."""
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(
            np.float64)


def neighbours(x):
    """(lo, hi, low16) of float32 x: truncation, next bf16 away from zero, dropped bits."""
    u = np.asarray(x, np.float32).view(np.uint32)
    lo = (u >> 16).astype(np.uint16)
    hi = (lo.astype(np.uint32) + 1).astype(np.uint16)  # NaN only can wrap; excluded
    return lo, hi, (u & 0xFFFF).astype(np.int64)


def is_nan_bits32(u):
    return (np.asarray(u, np.uint32) & 0x7FFFFFFF) > 0x7F800000


def sr_bits(x, seed, step=0, var_id=0):
    """uint16 bit patterns of ops.stochastic_round(x)."""
    return bits(ops.stochastic_round(tf.constant(x, tf.float32), seed=seed, step=step,
                                     var_id=var_id))


def round_up_indicator(pre_rounding, result_bits):
    """1 where result_bits is the upper neighbour of the float32 pre-rounding value.

    Also asserts the neighbour property for every element.
    """
    lo, hi, _ = neighbours(pre_rounding)
    result_bits = np.asarray(result_bits, np.uint16)
    ok = (result_bits == lo) | (result_bits == hi)
    assert ok.all(), (f"{np.count_nonzero(~ok)} results are not a bf16 neighbour of their "
                      f"pre-rounding value; first at {np.flatnonzero(~ok)[0]}")
    return (result_bits == hi).astype(np.float64)


def half_p_value(n, low16=0x8000):
    """n float32 values 1 + 2^-8: dropped bits 0x8000, so p = 1/2 exactly."""
    return np.full(n, f32_from_bits(0x3F800000 | low16), np.float32)


# ---------------------------------------------------------------------------
# 1. Neighbour property, exact values, NaN and infinities.


def _neighbour_inputs(rng):
    """float32 bit patterns covering every class of input."""
    parts = [
        # Uniform over all 2^32 patterns: every sign, exponent (subnormals,
        # normals, Inf/NaN) and mantissa.
        rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64),
        # float32 subnormals of both signs (exponent field 0); includes the
        # bf16-subnormal range and values below the smallest bf16 subnormal.
        rng.integers(1, 1 << 23, size=1 << 16, dtype=np.uint64)
        | (rng.integers(0, 2, size=1 << 16, dtype=np.uint64) << 31),
        # Just around the largest finite bf16 (0x7F7F): truncation 0x7F7F, round
        # up to +-Inf; and the bf16 step below it (0x7F7E).
        np.uint64(0x7F7F0000) + rng.integers(0, 1 << 16, size=1 << 14, dtype=np.uint64),
        np.uint64(0xFF7F0000) + rng.integers(0, 1 << 16, size=1 << 14, dtype=np.uint64),
        np.uint64(0x7F7E0000) + rng.integers(0, 1 << 17, size=1 << 14, dtype=np.uint64),
        # Exact bf16 values (low half zero), both signs, all exponents.
        rng.integers(0, 1 << 16, size=1 << 16, dtype=np.uint64) << 16,
        # Specials.
        np.array([
            0x00000000, 0x80000000,  # +-0
            0x7F800000, 0xFF800000,  # +-Inf
            0x00000001, 0x80000001,  # smallest float32 subnormals
            0x0000FFFF, 0x8000FFFF,  # largest values truncating to +-0
            0x00010000, 0x007FFFFF,  # smallest bf16 subnormal, largest f32 subnormal
            0x7F7F0000, 0x7F7F0001, 0x7F7FFFFF, 0xFF7FFFFF,  # max finite bf16 / f32
            0x7FC00000, 0xFFC00000,  # quiet NaNs
            0x7F800001, 0xFF800001,  # signalling NaNs, payload in the dropped bits only
            0x7F80FFFF, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
        ], np.uint64),
    ]
    return np.concatenate(parts).astype(np.uint32)


@pytest.mark.parametrize("seed", [0, 987654321])
def test_sr_result_is_a_bf16_neighbour(device, seed):
    rng = np.random.default_rng(20260101 + seed)
    u = _neighbour_inputs(rng)
    x = u.view(np.float32)
    got = sr_bits(x, seed=seed, step=3, var_id=5)
    assert got.shape == u.shape

    nan = is_nan_bits32(u)
    lo, hi, low16 = neighbours(x)

    # Every NaN, whatever its sign and payload, becomes the canonical quiet NaN
    # 0x7FC0 (docs/rounding.md, section 2).
    got_nan = got[nan]
    assert got_nan.size > 0
    assert_bits_equal(got_nan, np.full(got_nan.shape, 0x7FC0, np.uint16), "NaN result")

    # Every other result is the truncation or the next bf16 away from zero.
    g, lo, hi, low16, xf = got[~nan], lo[~nan], hi[~nan], low16[~nan], x[~nan]
    ok = (g == lo) | (g == hi)
    assert ok.all(), (f"{np.count_nonzero(~ok)} results are not a neighbour; first: x bits "
                      f"{u[~nan][~ok][0]:#010x} -> {g[~ok][0]:#06x}")
    # The helper's idea of the neighbours is right: lo <= |x| <= hi in magnitude.
    lo_v, hi_v = np.abs(bf16_bits_to_f64(lo)), np.abs(bf16_bits_to_f64(hi))
    ax = np.abs(xf.astype(np.float64))
    assert (lo_v <= ax).all() and ((ax <= hi_v) | np.isinf(ax)).all()

    # Exact bf16 values, including +-0 and +-Inf, never change.
    exact = low16 == 0
    assert_bits_equal(g[exact], lo[exact], "exact bf16 values")
    inf_in = np.isinf(xf)
    assert inf_in.sum() >= 2 and (g[inf_in] == lo[inf_in]).all(), "+-Inf changed"

    # Above the largest finite bf16: +-max or +-Inf, and both occur.
    near_max = (np.abs(xf) > 3.3895313892515355e38) & np.isfinite(xf)
    results = set(g[near_max].tolist())
    assert results <= {0x7F7F, 0x7F80, 0xFF7F, 0xFF80}
    assert {0x7F7F, 0x7F80, 0xFF7F, 0xFF80} <= results, results
    # Both neighbours occur for subnormal inputs too (rounding is not flushed).
    sub = (np.abs(xf) < np.float32(1.1754944e-38)) & (low16 != 0)
    assert np.any(g[sub] == hi[sub]) and np.any(g[sub] == lo[sub])
    assert np.any(g[sub & (lo == 0)] == 1), "no subnormal rounded up to the smallest bf16"


# ---------------------------------------------------------------------------
# 2. Unbiasedness and round-up frequency.

# float32 test values: (bit pattern, description). p = (bits & 0xFFFF) / 2^16.
UNBIASED_X = [
    (0x3F804CCD, "1 + 0.3 ulp"),
    (np.float32(-np.pi).view(np.uint32), "-pi"),
    (0x3F800100, "p = 1/256, rare round-up"),
    (0xBF80FF00, "negative, p = 255/256"),
    (np.float32(1e-30).view(np.uint32), "small normal 1e-30"),
    (0x00012345, "float32 subnormal 1.04e-40"),
    (0x8000C000, "negative subnormal, truncates to -0"),
    (np.float32(-65504.7).view(np.uint32), "large negative"),
]


def _draws_over_elements(x, n, seed):
    """[n, len(x)] SR draws: n elements holding each value, one call."""
    tiled = np.broadcast_to(x, (n, x.size)).copy()
    return sr_bits(tiled, seed=seed, step=1, var_id=2)


def _draws_over_keys(x, n, seed, vary):
    """[n, len(x)] SR draws of the same elements, key component `vary` = 0..n-1."""
    xt = tf.constant(x)

    @tf.function
    def draws():
        out = tf.TensorArray(tf.bfloat16, size=n)
        for i in tf.range(n, dtype=tf.int64):
            kwargs = {"step": tf.constant(4, tf.int64), "var_id": tf.constant(9, tf.int64)}
            kwargs[vary] = i
            out = out.write(tf.cast(i, tf.int32), ops.stochastic_round(xt, seed, **kwargs))
        return out.stack()

    return bits(draws())


@pytest.mark.parametrize("draws_over,n", [("elements", 1 << 20), ("step", 1 << 14),
                                          ("var_id", 1 << 14)])
def test_sr_is_unbiased(device, draws_over, n):
    x = f32_from_bits(np.array([b for b, _ in UNBIASED_X], np.uint32))
    if draws_over == "elements":
        got = _draws_over_elements(x, n, seed=11)
    else:
        got = _draws_over_keys(x, n, seed=11, vary=draws_over)
    assert got.shape == (n, x.size)
    lo, hi, low16 = neighbours(x)
    p = low16 / 65536.0  # exact round-up probability
    for j, (_, what) in enumerate(UNBIASED_X):
        col = got[:, j]
        up = round_up_indicator(np.full(n, x[j]), col)
        k = up.sum()
        # Round-up count ~ Binomial(n, p): |k - np| <= 5 sqrt(n p (1-p)).
        # (np >= 64 for every value here, so the normal approximation holds.)
        sd_k = math.sqrt(n * p[j] * (1 - p[j]))
        assert abs(k - n * p[j]) <= N_SIGMA * sd_k, (
            f"{what}: {k} round-ups in {n}, expected {n * p[j]:.1f} +- {sd_k:.1f}")
        # Mean of the values: each draw is lo + B*ulp with B ~ Bernoulli(p), so
        # the mean has expectation x and standard error sqrt(p(1-p)) * ulp / sqrt(n).
        ulp = abs(bf16_bits_to_f64(hi[j]) - bf16_bits_to_f64(lo[j]))
        mean = bf16_bits_to_f64(col).mean()
        se = math.sqrt(p[j] * (1 - p[j])) * ulp / math.sqrt(n)
        assert abs(mean - float(x[j])) <= N_SIGMA * se, (
            f"{what}: mean {mean!r} vs x {float(x[j])!r}, |diff| = "
            f"{abs(mean - float(x[j])) / se:.2f} standard errors")


# ---------------------------------------------------------------------------
# 3. Independence: correlation of round-up indicators.
#
# For round-up indicators U_A, U_B with known probabilities p_A, p_B, the
# standardized products z_A z_B, z = (U - p) / sqrt(p (1 - p)), have mean 0 and
# variance 1 when U_A and U_B are independent. Their average over n pairs has
# standard error 1/sqrt(n) (exactly, for independent pairs; for overlapping
# lagged pairs of one independent sequence, too: the products are
# uncorrelated), so |r| <= 5/sqrt(n). With p = 1/2, r is Pearson's correlation
# with the known mean.


def standardized(up, p):
    return (up - p) / np.sqrt(p * (1 - p))


def assert_uncorrelated(z_a, z_b, what):
    n = z_a.size
    r = float(np.mean(z_a * z_b))
    bound = N_SIGMA / math.sqrt(n)
    assert abs(r) <= bound, f"{what}: correlation {r:.5f} exceeds 5/sqrt({n}) = {bound:.5f}"


N_CORR = 1 << 20


def test_adjacent_elements_uncorrelated(device):
    x = half_p_value(N_CORR + (1 << 16))
    z = standardized(round_up_indicator(x, sr_bits(x, seed=21, step=0, var_id=0)), 0.5)
    # Lag 1 is "element i and i+1"; the others catch structure at power-of-two
    # strides (rows of typical tensors, SIMD widths) and far apart.
    for lag in (1, 2, 3, 8, 255, 256, 4096, 65536):
        assert_uncorrelated(z[:N_CORR], z[lag:lag + N_CORR], f"elements i, i+{lag}")
    # 2-D layout: rows are consecutive flat indices, so column neighbours are lag 1024.
    x2 = half_p_value(1024 * 1024).reshape(1024, 1024)
    z2 = standardized(round_up_indicator(x2, sr_bits(x2, seed=21)), 0.5)
    assert_uncorrelated(z2[:-1, :].ravel(), z2[1:, :].ravel(), "rows i, i+1")
    assert_uncorrelated(z2[:, :-1].ravel(), z2[:, 1:].ravel(), "columns j, j+1")


# Pairs of keys (seed, step, var_id) whose streams must be unrelated: adjacent
# values of each component, the high 32-bit word of each (a key built from the
# low word only would give identical bits: correlation 1), negatives, and
# permutations of the components.
KEY_PAIRS = [
    ((7, 0, 0), (7, 1, 0)),
    ((7, 1, 0), (7, 2, 0)),
    ((7, 999, 0), (7, 1000, 0)),
    ((7, 0, 0), (7, 1 << 32, 0)),
    ((7, 5, 0), (7, 5, 1)),
    ((7, 5, 1), (7, 5, 2)),
    ((7, 5, 0), (7, 5, 1 << 32)),
    ((0, 5, 3), (1, 5, 3)),
    ((0, 5, 3), (1 << 32, 5, 3)),
    ((-1, 5, 3), (0xFFFFFFFF, 5, 3)),
    ((1, 2, 3), (3, 2, 1)),
    ((1, 2, 3), (2, 1, 3)),
    ((1, 2, 3), (1, 3, 2)),
]


@pytest.mark.parametrize("key_a,key_b", KEY_PAIRS, ids=[f"{a}-{b}" for a, b in KEY_PAIRS])
def test_streams_uncorrelated(device, key_a, key_b):
    """Same elements, different step / var_id / seed: independent round-ups."""
    x = half_p_value(N_CORR)
    z_a = standardized(round_up_indicator(x, sr_bits(x, *key_a)), 0.5)
    z_b = standardized(round_up_indicator(x, sr_bits(x, *key_b)), 0.5)
    assert_uncorrelated(z_a, z_b, f"keys {key_a} vs {key_b}")


def _random_bf16(rng, n, low, high):
    return tf.cast(tf.constant(rng.uniform(low, high, n).astype(np.float32)), tf.bfloat16)


def _draw_indicators(update, states, n, observe=None):
    """Round-up indicators and probabilities of each state an update writes
    (of those named in `observe`, if given).

    `update(variables)` applies one optimizer step; `states` maps a name to the
    bf16 initial value. The same step on float32 variables holding the same
    (bf16-representable) values yields the exact pre-rounding float32 values
    (docs/rounding.md, section 5: the float32 path stores unrounded results and
    computes them with the same operations).
    """
    exact = {k: tf.Variable(tf.cast(v, tf.float32)) for k, v in states.items()}
    rounded = {k: tf.Variable(v) for k, v in states.items()}
    update(exact)
    update(rounded)
    out = {}
    for k in observe or states:
        pre = exact[k].numpy()
        _, _, low16 = neighbours(pre)
        out[k] = (round_up_indicator(pre, bits(rounded[k])), low16 / 65536.0)
    return out


def _assert_draws_uncorrelated(indicators, what):
    names = sorted(indicators)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (u_a, p_a), (u_b, p_b) = indicators[a], indicators[b]
            # Only elements whose round-up is genuinely random in both tensors
            # (selection by value, not by outcome, so it cannot bias r).
            sel = (p_a > 0.05) & (p_a < 0.95) & (p_b > 0.05) & (p_b < 0.95)
            assert sel.sum() > 50_000, (what, a, b, sel.sum())
            assert_uncorrelated(standardized(u_a[sel], p_a[sel]),
                                standardized(u_b[sel], p_b[sel]), f"{what}: {a} vs {b}")


N_DRAWS = 1 << 18


def test_sgd_weight_and_momentum_draws_uncorrelated(device):
    """The weight takes d0, the accumulator d1: the two halves of one h0."""
    rng = np.random.default_rng(5)
    grad = tf.constant(rng.uniform(0.5, 2.0, N_DRAWS).astype(np.float32))
    states = {"weight": _random_bf16(rng, N_DRAWS, -1, 1),
              "accum": _random_bf16(rng, N_DRAWS, -1, 1)}

    def update(v):
        ops.apply_sgd(v["weight"], grad, learning_rate=0.1, momentum=0.9,
                      accumulator=v["accum"], rounding="stochastic", seed=3, step=17,
                      var_id=4)

    _assert_draws_uncorrelated(_draw_indicators(update, states, N_DRAWS), "SGD momentum")


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_adam_weight_and_slot_draws_uncorrelated(device, rounding):
    """Stochastic: weight d0, m d1, v d2, vhat d3 (all four draws of an element);
    Kahan: m d0, v d1, vhat d2. vhat starts at 0, so vhat' = v': v and vhat
    round the same float32 value, and only their draws tell their bits apart."""
    rng = np.random.default_rng(6)
    grad = tf.constant(rng.uniform(0.5, 2.0, N_DRAWS).astype(np.float32))
    states = {"weight": _random_bf16(rng, N_DRAWS, -1, 1),
              "m": _random_bf16(rng, N_DRAWS, -0.5, 0.5),
              "v": _random_bf16(rng, N_DRAWS, 0.0, 0.5),
              "vhat": tf.zeros([N_DRAWS], tf.bfloat16)}
    compensation = tf.Variable(tf.zeros([N_DRAWS], tf.bfloat16))

    def update(v):
        bf16 = v["m"].dtype == tf.bfloat16
        ops.apply_adam(v["weight"], grad, v["m"], v["v"], learning_rate=0.01, vhat=v["vhat"],
                       rounding=rounding,
                       compensation=compensation if rounding == "kahan" and bf16 else None,
                       seed=3, step=17, var_id=4)

    # Under Kahan the weight is rounded to nearest, with its compensation.
    observe = ["m", "v", "vhat"] if rounding == "kahan" else None
    _assert_draws_uncorrelated(_draw_indicators(update, states, N_DRAWS, observe),
                               f"Adam/AMSGrad {rounding}")


# ---------------------------------------------------------------------------
# 4. Uniformity and independence of the 16-bit draws.


def _bisect_draw(n, rounds_up):
    """Recovers a 16-bit draw r per element from `rounds_up(x)`: a kernel call
    that rounds float32 x (n elements) stochastically with r and says which
    went up. x = 1 + l * 2^-23 (dropped bits l) rounds up iff r >= 2^16 - l, so
    16 calls with per-element thresholds binary-search r exactly."""
    lo = np.zeros(n, np.int64)
    hi = np.full(n, 1 << 16, np.int64)
    for _ in range(16):
        mid = (lo + hi) // 2  # in [1, 65535]
        up = rounds_up(f32_from_bits((0x3F800000 | (65536 - mid)).astype(np.uint32)))
        lo = np.where(up, mid, lo)
        hi = np.where(up, hi, mid)
    assert (hi - lo == 1).all()
    return lo


def recover_random_bits(n, seed, step, var_id):
    """Draw d0 of elements 0..n-1, read back through stochastic_round."""
    return _bisect_draw(n, lambda x: sr_bits(x, seed, step, var_id) != 0x3F80)


def recover_accumulator_draw(n, seed, step, var_id):
    """Draw d1 of elements 0..n-1, read back through SGD's accumulator under
    stochastic rounding: momentum 0 and learning rate 1 make the new
    accumulator exactly -g (0 * 0 - g * 1), rounded with d1."""
    w = tf.Variable(tf.zeros([n], tf.bfloat16))
    accum = tf.Variable(tf.zeros([n], tf.bfloat16))

    def rounds_up(x):
        accum.assign(tf.zeros([n], tf.bfloat16))
        ops.apply_sgd(w, tf.constant(x), learning_rate=1.0, momentum=0.0, accumulator=accum,
                      rounding="stochastic", seed=seed, step=step, var_id=var_id)
        return bits(accum) != 0xBF80  # -1 or, rounded up in magnitude, -(1 + 2^-7)

    return _bisect_draw(n, rounds_up)


def reference_draws(n, seed, step, var_id):
    """[d0, d1, d2, d3] of elements 0..n-1 (int64 arrays), from tf_bf16.reference."""
    key = reference.stream_key(tf.constant(seed, tf.int64), tf.constant(step, tf.int64),
                               tf.constant(var_id, tf.int64))
    return [d.numpy().astype(np.int64)
            for d in reference.draws(key, tf.range(n, dtype=tf.int64))]


def chi2_upper_lower(df, tail=1e-6):
    """(lower, upper) quantiles tail and 1 - tail of the chi-square distribution.

    scipy when installed; otherwise the Wilson-Hilferty approximation
    chi2_q ~= df * (1 - 2/(9 df) + z_q sqrt(2/(9 df)))^3, z_q the normal quantile,
    within 0.1% of scipy's quantiles at df = 255, tail 1e-6 (161.5 vs 161.7,
    377.2 vs 377.1).
    """
    try:
        from scipy import stats
        return float(stats.chi2.ppf(tail, df)), float(stats.chi2.isf(tail, df))
    except ImportError:  # pragma: no cover - scipy is installed here
        from statistics import NormalDist
        z = NormalDist().inv_cdf(1 - tail)
        c = 2.0 / (9.0 * df)
        return df * (1 - c - z * math.sqrt(c)) ** 3, df * (1 - c + z * math.sqrt(c)) ** 3


def chi_square(counts):
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def joint_high_nibbles(a, b):
    """Counts of the 256 (high nibble of a, high nibble of b) pairs of 16-bit draws."""
    return np.bincount(((a >> 12) << 4) | (b >> 12), minlength=256)


def assert_chi_square_256(tests, what):
    """Each entry of `tests` is 256 counts, chi-square with 255 degrees of freedom
    under uniformity (for a joint histogram: under independence of two uniform
    draws). Both tails at 1e-6: too large = non-uniform or dependent, too small
    = too regular to be random."""
    lower, upper = chi2_upper_lower(255)
    stats = {name: chi_square(counts) for name, counts in tests.items()}
    bad = {name: stat for name, stat in stats.items() if not lower <= stat <= upper}
    assert not bad, (
        f"{what}: chi-square (255 df) outside [{lower:.1f}, {upper:.1f}] for {sorted(bad)}; "
        f"all: " + ", ".join(f"{w} {v:.1f}" for w, v in stats.items()))


# 4M elements (the size of one mid-sized weight tensor): the largest sample
# that keeps a kernel read-back near one second per key here. Expected count
# per cell 16384 (8192 for the serial pairs), far above the usual >= 5 rule.
N_UNIFORM = 1 << 22
UNIFORM_KEYS = [(0, 0, 0), (2026, 10**12, 7), (-5, 3, 1 << 40)]


@pytest.mark.parametrize("key", UNIFORM_KEYS)
def test_random_bits_uniform_chi_square(device, key):
    """Every draw of an element is uniform over the 2^16 values: d0 and d1 read
    back through the kernels (and equal to the specification's, bit for bit),
    d2 and d3 from the reference."""
    n = N_UNIFORM
    spec = reference_draws(n, *key)
    kernel = {0: recover_random_bits(n, *key), 1: recover_accumulator_draw(n, *key)}
    for k, r in kernel.items():
        np.testing.assert_array_equal(r, spec[k], err_msg=f"kernel's d{k} vs the spec's")
    for k, r in enumerate(spec):
        assert_chi_square_256({
            "high byte": np.bincount(r >> 8, minlength=256),
            "low byte": np.bincount(r & 0xFF, minlength=256),
            # Serial test: high nibbles of disjoint pairs (element 2i, 2i+1).
            "pairs of high nibbles": joint_high_nibbles(r[0::2], r[1::2]),
        }, f"key {key}, draw d{k}")
        # Every one of the 2^16 values occurs: with 4M draws the expected
        # number of missing values is 65536 * exp(-64) ~ 1e-23.
        assert np.unique(r).size == 65536, f"key {key}, d{k}"


@pytest.mark.parametrize("key", UNIFORM_KEYS)
def test_draws_of_one_element_independent(key):
    """The four draws of one element come from one hash chain (d0, d1 the halves
    of h0; d2, d3 those of h1 = Mix32(h0 ^ C)): every pair of them, and the
    same draw of adjacent elements, must look independent. Joint histogram of
    their high nibbles: 256 cells, chi-square with 255 degrees of freedom
    under independence (both draws uniform, as tested above)."""
    d = reference_draws(N_UNIFORM, *key)
    tests = {f"d{a} vs d{b}": joint_high_nibbles(d[a], d[b])
             for a in range(4) for b in range(a + 1, 4)}
    # Low nibbles too: d1 and d3 are low halves, and a weak hash shows first
    # in its low bits.
    tests.update({f"low nibbles d{a} vs d{b}": np.bincount(((d[a] & 15) << 4) | (d[b] & 15),
                                                           minlength=256)
                  for a, b in [(0, 1), (1, 2), (2, 3), (1, 3)]})
    tests.update({f"d{k} of elements i, i+1": joint_high_nibbles(d[k][:-1], d[k][1:])
                  for k in range(4)})
    assert_chi_square_256(tests, f"key {key}")


# Same elements, neighbouring keys: every draw of one stream against the same
# draw, and the neighbouring draw, of the other.
DRAW_KEY_PAIRS = [((7, 0, 0), (7, 1, 0)), ((7, 5, 0), (7, 5, 1)), ((0, 5, 3), (1, 5, 3)),
                  ((7, 0, 0), (7, 1 << 32, 0))]


@pytest.mark.parametrize("key_a,key_b", DRAW_KEY_PAIRS,
                         ids=[f"{a}-{b}" for a, b in DRAW_KEY_PAIRS])
def test_draws_of_neighbouring_streams_independent(key_a, key_b):
    n = 1 << 21
    da, db = reference_draws(n, *key_a), reference_draws(n, *key_b)
    tests = {f"d{k} vs d{k}": joint_high_nibbles(da[k], db[k]) for k in range(4)}
    tests.update({f"d{k} vs d{k + 1}": joint_high_nibbles(da[k], db[k + 1]) for k in range(3)})
    assert_chi_square_256(tests, f"keys {key_a} vs {key_b}")


# ---------------------------------------------------------------------------
# 5. Determinism.


def test_same_key_gives_identical_bits(device):
    rng = np.random.default_rng(9)
    x = rng.standard_normal(1 << 16).astype(np.float32)
    first = sr_bits(x, seed=42, step=7, var_id=3)
    assert_bits_equal(first, sr_bits(x, seed=42, step=7, var_id=3), "eager, twice")
    graph = tf.function(lambda t: ops.stochastic_round(t, seed=42, step=7, var_id=3))
    assert_bits_equal(first, bits(graph(tf.constant(x))), "tf.function")
    # The bits depend on the flat index only: shape and prefixes do not matter.
    assert_bits_equal(first, sr_bits(x.reshape(256, 16, 16), 42, 7, 3).reshape(-1), "shape")
    assert_bits_equal(first[:1000], sr_bits(x[:1000], 42, 7, 3), "prefix")
    # Tensor-valued key components give the same as Python numbers.
    t = lambda v, d: tf.constant(v, d)  # noqa: E731
    assert_bits_equal(first, bits(ops.stochastic_round(
        tf.constant(x), t(42, tf.int32), t(7, tf.int64), t(3, tf.int32))), "tensor keys")


@pytest.mark.parametrize("change", ["seed", "step", "var_id"])
@pytest.mark.parametrize("by", [1, 1 << 32, -(1 << 63)])
def test_changing_one_key_component_changes_bits(device, change, by):
    n = 1 << 14
    x = half_p_value(n)
    base = {"seed": 42, "step": 7, "var_id": 3}
    other = dict(base)
    other[change] = (other[change] + by + (1 << 63)) % (1 << 64) - (1 << 63)  # wrap int64
    a = sr_bits(x, **base)
    b = sr_bits(x, **other)
    # With p = 1/2 two independent draws differ with probability 1/2:
    # the fraction of differing elements is within 5 * 0.5/sqrt(n) of 1/2
    # (which also excludes "identical").
    diff = np.mean(a != b)
    assert abs(diff - 0.5) <= N_SIGMA * 0.5 / math.sqrt(n), (change, by, diff)


_THREADS_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    threads, out = int(sys.argv[1]), sys.argv[2]
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from tf_bf16 import ops

    n = 1 << 22          # 4M elements: the kernels shard this over the pool
    rng = np.random.default_rng(1234)
    x = tf.constant(rng.standard_normal(n).astype(np.float32))
    g = tf.constant(rng.standard_normal(n).astype(np.float32))
    init = tf.cast(tf.constant(rng.standard_normal(n).astype(np.float32)), tf.bfloat16)
    res = {"sr": ops.stochastic_round(x, seed=5, step=6, var_id=7)}

    w = tf.Variable(init)
    ops.rounded_assign_add(w, x * 1e-3, rounding="stochastic", seed=5, step=6, var_id=7)
    res["assign_add"] = w
    w, c = tf.Variable(init), tf.Variable(tf.zeros([n], tf.bfloat16))
    for s in range(3):
        ops.rounded_assign_add(w, x * 1e-3, rounding="kahan", compensation=c)
    res["kahan_w"], res["kahan_c"] = w, c
    w, a = tf.Variable(init), tf.Variable(tf.zeros([n], tf.bfloat16))
    for s in range(3):
        ops.apply_sgd(w, g, 0.01, momentum=0.9, accumulator=a, nesterov=True,
                      weight_decay=0.01, rounding="stochastic", seed=5, step=s, var_id=1)
    res["sgd_w"], res["sgd_a"] = w, a
    w, m, v, vh = (tf.Variable(init), tf.Variable(tf.zeros([n], tf.bfloat16)),
                   tf.Variable(tf.zeros([n], tf.bfloat16)), tf.Variable(tf.zeros([n], tf.bfloat16)))
    for s in range(3):
        ops.apply_adam(w, g, m, v, 0.001, vhat=vh, weight_decay=0.01, step=s,
                       rounding="stochastic", seed=5, var_id=2)
    res.update(adam_w=w, adam_m=m, adam_v=v, adam_vh=vh)
    # Sparse: 65536 rows of 64, duplicate indices (groups run in parallel).
    rows = 1 << 16
    w, a = tf.Variable(tf.reshape(init, [rows, 64])), tf.Variable(tf.zeros([rows, 64], tf.bfloat16))
    idx = tf.constant(rng.integers(0, rows, size=rows).astype(np.int64))
    vals = tf.reshape(g, [rows, 64])
    ops.apply_sgd(w, tf.IndexedSlices(vals, idx, tf.constant([rows, 64], tf.int64)), 0.01,
                  momentum=0.9, accumulator=a, rounding="stochastic", seed=5, step=1, var_id=3)
    res["sparse_w"], res["sparse_a"] = w, a
    arrays = {k: np.asarray(v.numpy()).view(np.uint16) for k, v in res.items()}
    arrays["_threads"] = np.array(tf.config.threading.get_intra_op_parallelism_threads())
    np.savez(out, **arrays)
""")


def test_results_independent_of_thread_count(tmp_path):
    """Same ops, 4M-element tensors, intra-op pools of 1 and 2 threads: same bytes.

    With 2 threads these kernels run ~2x faster than with 1 on this machine
    (measured), i.e. the work really is split; the bits must not depend on how.
    """
    script = tmp_path / "threads.py"
    script.write_text(_THREADS_SCRIPT)
    # The child imports this checkout (not whatever tf_bf16 is installed).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    procs = {}
    for threads in (1, 2):
        out = tmp_path / f"out_{threads}.npz"
        procs[threads] = (out, subprocess.Popen(
            [sys.executable, str(script), str(threads), str(out)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for threads, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{threads} threads:\n{log[-3000:]}"
        results[threads] = dict(np.load(out))
        assert int(results[threads].pop("_threads")) == threads
    one, two = results[1], results[2]
    assert one.keys() == two.keys() and len(one) == 12
    for name in one:
        assert_bits_equal(one[name], two[name], f"{name}: 1 vs 2 threads")
