"""Every op in tf_bf16.ops equals the pure-TF tf_bf16.reference BIT FOR BIT.

Each test builds two identical sets of variables (weight, optimizer slots and,
for Kahan on bfloat16, the compensation buffer), runs the C++ kernel on one and
the reference on the other for several steps in a row (so that rounded state
feeds back), and after every step compares every updated tensor bit for bit.

Values cover normal numbers, huge ones (near the float32 / bfloat16 maximum,
so that updates overflow), tiny ones (subnormals and the smallest normals, so
that TensorFlow's flush-to-zero matters), +0.0 and -0.0, NaNs with different
signs and payloads (quiet and signalling) and +-Inf, in weights, gradients and
slots alike. Every NaN an update writes must be the canonical quiet NaN on
both sides (docs/rounding.md), so NaNs are compared bit for bit too. Shapes
cover scalars, empty tensors, odd sizes, several ranks and one variable of ~2M
elements, large enough to be split over the intra-op thread pool. Sparse
updates use int32 and int64 indices, duplicates and empty index lists.
"""

import numpy as np
import pytest
import tensorflow as tf

from conftest import DTYPES, assert_bits_equal, bits
from tf_bf16 import ROUNDINGS
from tf_bf16 import ops
from tf_bf16 import reference

# ---------------------------------------------------------------------------
# Test values.

KINDS = ("normal", "huge", "tiny", "zeros", "nonfinite")

# NaNs of both signs, default and with payloads, quiet and signalling (with the
# payload in the top 16 bits, so that it survives as a bfloat16 NaN, and in the
# low bits only, which a float32 keeps and a bfloat16 truncation turns into
# Inf), and both infinities.
NONFINITE_BITS = np.array(
    [0x7FC00000, 0xFFC00000, 0x7FC12345, 0xFFE50000, 0x7F810000, 0xFF8A0000,
     0x7F800001, 0x7F800000, 0xFF800000], np.uint32)

# Subnormals (float32 and bfloat16 ones), the largest subnormal, the smallest
# normal and small normals whose products and sums underflow.
TINY = np.array(
    [1.4e-45, 3e-42, 9.2e-41, 1e-40, 1e-39, 5.9e-39, 1.1754942e-38, 1.17549435e-38,
     2e-38, 1e-37, 3e-36], np.float32)

F32_MAX = float(np.finfo(np.float32).max)
BF16_MAX = 3.3895313892515355e38


def _values(rng, shape, kind):
    """float32 test values of one kind ("mixed": every element its own kind)."""
    n = int(np.prod(shape, dtype=np.int64))
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)
    if kind == "normal":
        out = rng.standard_normal(n).astype(np.float32)
    elif kind == "huge":
        out = sign * rng.uniform(1e37, BF16_MAX, n).astype(np.float32)
        near_max = rng.random(n) < 0.2
        out[near_max] = (sign * np.float32(F32_MAX))[near_max]
    elif kind == "tiny":
        out = sign * rng.choice(TINY, n)
    elif kind == "zeros":
        out = sign * np.float32(0.0)
    elif kind == "nonfinite":
        out = rng.standard_normal(n).astype(np.float32)
        special = rng.random(n) < 0.7
        out[special] = rng.choice(NONFINITE_BITS, n).view(np.float32)[special]
    elif kind == "mixed":
        choice = rng.integers(0, len(KINDS), n)
        out = np.empty(n, np.float32)
        for i, k in enumerate(KINDS):
            where = choice == i
            out[where] = _values(rng, (int(where.sum()),), k)
    else:
        raise ValueError(kind)
    return np.asarray(out, np.float32).reshape(shape)


def _tensor(values, dtype):
    """A tensor with exactly these bits (bfloat16: the top 16 bits of each float32)."""
    values = np.ascontiguousarray(values, np.float32)
    if dtype == tf.float32:
        return tf.constant(values)
    return tf.bitcast(tf.constant((values.view(np.uint32) >> 16).astype(np.uint16)),
                      tf.bfloat16)


# ---------------------------------------------------------------------------
# Update variants and a runner that applies one to kernel and reference alike.

LR = 0.0137
MOMENTUM = 0.9
WEIGHT_DECAY = 0.04
# Stream keys with non-trivial high 32-bit halves (negative, >= 2**32).
SEED = 2**33 + 7
VAR_ID = -5


class Variant:
    def __init__(self, name, op, momentum=False, nesterov=False, weight_decay=0.0,
                 amsgrad=False):
        self.name, self.op = name, op
        self.momentum, self.nesterov = momentum, nesterov
        self.weight_decay, self.amsgrad = weight_decay, amsgrad

    def __repr__(self):
        return self.name

    def slots(self):
        if self.op == "sgd":
            return ["accum"] if self.momentum else []
        if self.op == "adam":
            return ["m", "v"] + (["vhat"] if self.amsgrad else [])
        if self.op == "lion":
            return ["m"]
        return []


DENSE_VARIANTS = [
    Variant("assign_add", "assign_add"),
    Variant("sgd", "sgd"),
    Variant("sgd_wd", "sgd", weight_decay=WEIGHT_DECAY),
    Variant("momentum", "sgd", momentum=True),
    Variant("nesterov", "sgd", momentum=True, nesterov=True),
    Variant("momentum_wd", "sgd", momentum=True, weight_decay=WEIGHT_DECAY),
    Variant("adam", "adam"),
    Variant("amsgrad", "adam", amsgrad=True),
    Variant("adamw", "adam", weight_decay=WEIGHT_DECAY),
]

ASSIGN_ADD = DENSE_VARIANTS[0]
MOMENTUM_WD = DENSE_VARIANTS[5]
# The fullest updates: every slot, weight decay.
NESTEROV_WD = Variant("nesterov_wd", "sgd", momentum=True, nesterov=True,
                      weight_decay=WEIGHT_DECAY)
AMSGRAD_WD = Variant("amsgrad_wd", "adam", amsgrad=True, weight_decay=WEIGHT_DECAY)

SPARSE_VARIANTS = [
    Variant("sgd", "sgd"),
    Variant("momentum", "sgd", momentum=True),
    NESTEROV_WD,
    Variant("adam", "adam"),
    AMSGRAD_WD,
]


def _initial_state(rng, variant, shape, dtype, rounding, kind):
    """role -> initial tensor, for the weight, its slots and its compensation."""
    state = {"var": _tensor(_values(rng, shape, kind), dtype)}
    for slot in variant.slots():
        values = _values(rng, shape, kind)
        if slot in ("v", "vhat") and kind == "normal":
            values = np.abs(values)  # a real second moment; other kinds keep any sign
        state[slot] = _tensor(values, dtype)
    if rounding == "kahan" and dtype == tf.bfloat16:
        # A compensation buffer holds the small residuals of earlier steps.
        comp = _values(rng, shape, kind)
        if kind == "normal":
            comp *= np.float32(1e-3)
        state["compensation"] = _tensor(comp, tf.bfloat16)
    return state


def _variables(state):
    return {role: tf.Variable(value, name=role) for role, value in state.items()}


def _apply(module, variant, variables, gradient, rounding, step):
    comp = variables.get("compensation")
    if variant.op == "assign_add":
        return module.rounded_assign_add(variables["var"], gradient, rounding=rounding,
                                         compensation=comp, seed=SEED, step=step,
                                         var_id=VAR_ID)
    if variant.op == "sgd":
        return module.apply_sgd(variables["var"], gradient, LR,
                                momentum=MOMENTUM if variant.momentum else 0.0,
                                accumulator=variables.get("accum"),
                                nesterov=variant.nesterov,
                                weight_decay=variant.weight_decay, rounding=rounding,
                                compensation=comp, seed=SEED, step=step, var_id=VAR_ID)
    if variant.op == "lion":
        return module.apply_lion(variables["var"], gradient, variables["m"], LR, beta_1=0.9,
                                 beta_2=0.99, weight_decay=variant.weight_decay,
                                 rounding=rounding, compensation=comp, seed=SEED, step=step,
                                 var_id=VAR_ID)
    return module.apply_adam(variables["var"], gradient, variables["m"], variables["v"], LR,
                             beta_1=0.9, beta_2=0.999, epsilon=1e-7, step=step,
                             vhat=variables.get("vhat"), weight_decay=variant.weight_decay,
                             rounding=rounding, compensation=comp, seed=SEED, var_id=VAR_ID)


def _nan_mask(x):
    x = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
    return np.isnan(x.astype(np.float32))


class BitChecker:
    """Bit-for-bit comparison of kernel and reference states.

    A difference in value fails at once. A difference only in the sign or
    payload of a NaN (both sides NaN) is a failure too (NaN results are
    canonical by specification), but it is collected and reported when the
    test ends, so that every later step is still checked for differences in
    value first: a NaN stays a NaN through every later operation, so it
    cannot hide one.
    """

    def __init__(self, got="kernel", want="reference"):
        self.nan_only = []
        self.got, self.want = got, want

    def compare(self, got, want, what):
        got_bits, want_bits = bits(got).reshape(-1), bits(want).reshape(-1)
        assert got_bits.shape == want_bits.shape, f"{what}: shapes differ"
        differ = got_bits != want_bits
        if not differ.any():
            return
        both_nan = _nan_mask(got).reshape(-1) & _nan_mask(want).reshape(-1)
        value_differ = np.flatnonzero(differ & ~both_nan)
        nan_differ = np.flatnonzero(differ & both_nan)
        if value_differ.size:
            i = value_differ[0]
            raise AssertionError(
                f"{what}: {value_differ.size} of {got_bits.size} elements differ in value "
                f"(and {nan_differ.size} more only in NaN sign/payload); first at flat index "
                f"{i}: {self.got} {got_bits[i]:#x} != {self.want} {want_bits[i]:#x}")
        i = nan_differ[0]
        self.nan_only.append(
            f"{what}: {nan_differ.size} of {got_bits.size} elements are NaN on both sides but "
            f"differ in NaN sign/payload; first at flat index {i}: {self.got} {got_bits[i]:#x} != "
            f"{self.want} {want_bits[i]:#x}")

    def compare_states(self, kernel_vars, reference_vars, what):
        assert kernel_vars.keys() == reference_vars.keys()
        for role in kernel_vars:
            self.compare(kernel_vars[role], reference_vars[role], f"{what}, {role}")

    def finish(self):
        assert not self.nan_only, (
            f"{len(self.nan_only)} comparisons differ only in NaN sign/payload (every non-NaN "
            "bit matched):\n" + "\n".join(self.nan_only[:8]))


def _run_dense(checker, rng, variant, shape, dtype, gdtype, rounding, kind, steps):
    state = _initial_state(rng, variant, shape, dtype, rounding, kind)
    kernel_vars, reference_vars = _variables(state), _variables(state)
    for step in range(steps):
        gradient = _tensor(_values(rng, shape, kind), gdtype)
        _apply(ops, variant, kernel_vars, gradient, rounding, step)
        _apply(reference, variant, reference_vars, gradient, rounding, step)
        checker.compare_states(kernel_vars, reference_vars,
                               f"{variant} shape={shape} kind={kind} step={step}")


# (shape, kind of values): scalars, empty tensors, odd sizes and several ranks.
# "mixed" draws each element of each tensor from every kind independently, so
# all combinations of weight / gradient / slot kinds occur.
DENSE_CASES = [
    ((), "mixed"),
    ((0,), "normal"),
    ((0, 3), "normal"),
    ((1,), "nonfinite"),
    ((7,), "tiny"),
    ((1001,), "mixed"),
    ((4, 5, 6), "mixed"),
    ((2, 1, 9), "huge"),
    ((3, 2), "zeros"),
]
STEPS = 3


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
@pytest.mark.parametrize("variant", DENSE_VARIANTS, ids=repr)
def test_dense_update_matches_reference(device, variant, dtype, gdtype, rounding):
    checker = BitChecker()
    rng = np.random.default_rng(1234)
    for shape, kind in DENSE_CASES:
        _run_dense(checker, rng, variant, shape, dtype, gdtype, rounding, kind, STEPS)
    checker.finish()


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
def test_each_kind_of_value_matches_reference(device, kind, dtype, rounding):
    """One kind of value in every tensor at once, for the fullest SGD and Adam updates."""
    checker = BitChecker()
    rng = np.random.default_rng(99)
    for variant in (MOMENTUM_WD, AMSGRAD_WD):
        for gdtype in DTYPES:
            _run_dense(checker, rng, variant, (33,), dtype, gdtype, rounding, kind, STEPS)
    checker.finish()


LARGE_SHAPE = (1024, 2048)  # 2,097,152 elements: many shards on the intra-op pool


# Kept to the fullest updates so that the runtime stays modest: bfloat16
# variables with every rounding and both gradient dtypes, float32 variables
# (which ignore the rounding) with both gradient dtypes, and rounded_assign_add
# with Kahan.
@pytest.mark.parametrize("variant,dtype,gdtype,rounding", [
    (NESTEROV_WD, tf.bfloat16, tf.float32, "nearest"),
    (NESTEROV_WD, tf.bfloat16, tf.bfloat16, "stochastic"),
    (NESTEROV_WD, tf.bfloat16, tf.float32, "kahan"),
    (AMSGRAD_WD, tf.bfloat16, tf.bfloat16, "nearest"),
    (AMSGRAD_WD, tf.bfloat16, tf.float32, "stochastic"),
    (AMSGRAD_WD, tf.bfloat16, tf.bfloat16, "kahan"),
    (AMSGRAD_WD, tf.float32, tf.bfloat16, "stochastic"),
    (NESTEROV_WD, tf.float32, tf.float32, "nearest"),
    (ASSIGN_ADD, tf.bfloat16, tf.float32, "kahan"),
], ids=lambda p: p.name if isinstance(p, tf.DType) else str(p))
def test_large_variable_matches_reference(device, variant, dtype, gdtype, rounding):
    checker = BitChecker()
    rng = np.random.default_rng(7)
    _run_dense(checker, rng, variant, LARGE_SHAPE, dtype, gdtype, rounding, "mixed", steps=2)
    checker.finish()


LION_VARIANTS = [Variant("lion", "lion"), Variant("lion_wd", "lion", weight_decay=WEIGHT_DECAY)]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
@pytest.mark.parametrize("variant", LION_VARIANTS, ids=repr)
def test_lion_matches_reference(device, variant, dtype, gdtype, rounding):
    """apply_lion (added after the other ops): same cases as the dense matrix."""
    checker = BitChecker()
    rng = np.random.default_rng(2468)
    for shape, kind in DENSE_CASES:
        _run_dense(checker, rng, variant, shape, dtype, gdtype, rounding, kind, STEPS)
    checker.finish()


# Every public op and the tests above that compare it with the reference.
COVERED_OPS = {
    "stochastic_round": "test_stochastic_round_matches_reference",
    "rounded_assign_add": "test_dense_update_matches_reference",
    "apply_sgd": "test_sparse_update_matches_reference",
    "apply_adam": "test_sparse_update_matches_reference",
    "apply_lion": "test_lion_matches_reference",
}


def test_every_public_op_is_compared_with_the_reference():
    missing = sorted(set(ops.__all__) - set(COVERED_OPS))
    assert not missing, f"ops without a kernel-vs-reference test: {missing}"
    for name in ops.__all__:
        assert hasattr(reference, name), f"tf_bf16.reference has no {name}"
        assert COVERED_OPS[name] in globals()


# ---------------------------------------------------------------------------
# stochastic_round

STREAMS = [(0, 0, 0), (SEED, 3, VAR_ID), (-1, 2**40 + 3, 2**63 - 1), (12345, -(2**62), 2**32)]


@pytest.mark.parametrize("seed,step,var_id", STREAMS)
def test_stochastic_round_matches_reference(device, seed, step, var_id):
    rng = np.random.default_rng(seed & 0xFFFF)
    for shape, kind in DENSE_CASES + [((5, 7), "nonfinite"), ((11,), "huge")]:
        x = tf.constant(_values(rng, shape, kind))
        got = ops.stochastic_round(x, seed, step, var_id)
        want = reference.stochastic_round(x, seed, step, var_id)
        assert got.dtype == tf.bfloat16 and got.shape == x.shape
        assert_bits_equal(got, want, f"stochastic_round shape={shape} kind={kind}")


def test_stochastic_round_large_matches_reference(device):
    rng = np.random.default_rng(3)
    x = tf.constant(_values(rng, LARGE_SHAPE, "mixed"))
    assert_bits_equal(ops.stochastic_round(x, SEED, 11, VAR_ID),
                      reference.stochastic_round(x, SEED, 11, VAR_ID), "large")


# ---------------------------------------------------------------------------
# Sparse updates (IndexedSlices gradients).

# (variable shape, list of index lists, one per step; kind of values).
# Duplicates are applied in order; empty index lists update nothing.
SPARSE_CASES = [
    ((10, 3), [[3, 0, 3, 9, 3, 5], [9, 9, 1]], "mixed"),
    ((10, 3), [[], [4]], "normal"),
    ((0, 3), [[], []], "normal"),
    ((11,), [[10, 0, 5, 2], [7, 7]], "mixed"),
    ((6, 2, 3), [[5, 1, 1, 0], [2]], "nonfinite"),
    ((5, 4), [[4, 1], [0, 3, 3]], "tiny"),
]


def _run_sparse(checker, rng, variant, shape, index_lists, kind, dtype, gdtype, rounding):
    state = _initial_state(rng, variant, shape, dtype, rounding, kind)
    kernel_vars, reference_vars = _variables(state), _variables(state)
    for step, index_list in enumerate(index_lists):
        index_dtype = (tf.int32, tf.int64)[step % 2]
        indices = tf.constant(index_list, index_dtype, shape=[len(index_list)])
        values = _tensor(_values(rng, (len(index_list),) + shape[1:], kind), gdtype)
        gradient = tf.IndexedSlices(values, indices, tf.constant(shape, tf.int64))
        before = {role: v.read_value() for role, v in kernel_vars.items()}
        _apply(ops, variant, kernel_vars, gradient, rounding, step)
        _apply(reference, variant, reference_vars, gradient, rounding, step)
        what = (f"{variant} shape={shape} indices={index_list} ({index_dtype.name}) "
                f"kind={kind} step={step}")
        checker.compare_states(kernel_vars, reference_vars, what)
        # Independently of the reference: rows without a gradient are untouched.
        untouched = tf.constant(sorted(set(range(shape[0])) - set(index_list)), tf.int64,
                                shape=[shape[0] - len(set(index_list))])
        for role, variable in kernel_vars.items():
            assert_bits_equal(tf.gather(variable, untouched), tf.gather(before[role], untouched),
                              f"{what}, untouched rows of {role}")


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
@pytest.mark.parametrize("variant", SPARSE_VARIANTS, ids=repr)
def test_sparse_update_matches_reference(device, variant, dtype, gdtype, rounding):
    """int32 indices on even steps, int64 on odd ones, for every case."""
    checker = BitChecker()
    rng = np.random.default_rng(4321)
    for shape, index_lists, kind in SPARSE_CASES:
        _run_sparse(checker, rng, variant, shape, index_lists, kind, dtype, gdtype, rounding)
    checker.finish()


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
def test_sparse_row_gets_same_bits_as_dense(device, dtype, rounding):
    """A sparse update of every row once equals the dense update (docs/rounding.md 5.4)."""
    checker = BitChecker()
    rng = np.random.default_rng(5)
    variant = AMSGRAD_WD
    shape = (6, 5)
    state = _initial_state(rng, variant, shape, dtype, rounding, "mixed")
    dense_vars, sparse_vars = _variables(state), _variables(state)
    for step in range(2):
        grad = _tensor(_values(rng, shape, "mixed"), tf.float32)
        order = tf.constant([3, 0, 5, 1, 4, 2], tf.int64)
        _apply(ops, variant, dense_vars, grad, rounding, step)
        _apply(ops, variant, sparse_vars,
               tf.IndexedSlices(tf.gather(grad, order), order, tf.constant(shape, tf.int64)),
               rounding, step)
        checker.compare_states(sparse_vars, dense_vars, f"sparse vs dense step {step}")
    checker.finish()


# ---------------------------------------------------------------------------
# Minimal cases, one cause each, of disagreements the matrix above has shown
# (on this or an earlier build of the library).


def _uniform(bits32, n, dtype):
    """n copies of one float32 bit pattern (bfloat16: its top 16 bits)."""
    return _tensor(np.full(n, bits32, np.uint32).view(np.float32), dtype)


CANONICAL_NAN = {tf.float32: 0x7FC00000, tf.bfloat16: 0x7FC0}

# (variant, weight bits, gradient/delta bits)
NAN_CASES = [
    # Two NaN operands of one addition: x86 returns one operand's NaN, and a
    # vectorizing compiler may swap the operands (before NaNs were made
    # canonical, the kernel's NaN depended on the element's position in the
    # loop, and differed from the reference's).
    (ASSIGN_ADD, 0x7FC10000, 0xFFC00000),
    # One NaN operand: delta = -step flips the NaN's sign in the reference,
    # while the compiled kernel computes w - step, which does not.
    (DENSE_VARIANTS[1], 0x3F800000, 0x7FC00000),
    (DENSE_VARIANTS[1], 0x3F800000, 0xFFC00000),
    (AMSGRAD_WD, 0x3F800000, 0xFFC12345),
]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
def test_nan_results_are_canonical_and_match_reference(device, dtype, rounding):
    """Every NaN an update produces is the canonical quiet NaN (docs/rounding.md).

    IEEE 754 leaves the sign and payload of a NaN produced by arithmetic open;
    bit-for-bit agreement needs one answer, for every element whatever its
    position in the vectorized loop (37 elements: vector body and scalar tail).
    """
    n = 37
    for variant, weight_bits, grad_bits in NAN_CASES:
        state = {"var": _uniform(weight_bits, n, dtype)}
        for slot in variant.slots():
            state[slot] = _uniform(0, n, dtype)
        if rounding == "kahan" and dtype == tf.bfloat16:
            state["compensation"] = tf.zeros([n], tf.bfloat16)
        gradient = _uniform(grad_bits, n, tf.float32)
        kernel_vars, reference_vars = _variables(state), _variables(state)
        _apply(ops, variant, kernel_vars, gradient, rounding, 0)
        _apply(reference, variant, reference_vars, gradient, rounding, 0)
        what = f"{variant}: weight {weight_bits:#x}, gradient {grad_bits:#x}"
        for role in state:
            got = bits(kernel_vars[role])
            is_nan = np.isnan(kernel_vars[role].numpy().astype(np.float32))
            rdtype = tf.bfloat16 if role == "compensation" else dtype
            odd = sorted({hex(b) for b in got[is_nan].tolist()} - {hex(CANONICAL_NAN[rdtype])})
            assert not odd, f"{what}, {role}: non-canonical NaNs {odd}"
            assert_bits_equal(kernel_vars[role], reference_vars[role], f"{what}, {role}")
        assert np.isnan(kernel_vars["var"].numpy().astype(np.float32)).all(), what


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
def test_amsgrad_keeps_a_subnormal_vhat_like_reference(device, dtype, rounding):
    """vhat' = (isnan(v') or v' > vhat) ? v' : vhat is a selection, not arithmetic.

    With v' = 0 and a subnormal vhat (treated as 0 by the comparison under
    denormals-are-zero), vhat is kept, bits and all, by the reference
    (docs/rounding.md 5.3); the kernel must keep it too. A build that compiled
    this selection to a max instruction (maxps, which flushes the subnormal
    under DAZ) wrote 0 for float32 variables.
    """
    n = 37
    subnormal = 0x000AE398  # 1e-39; as bfloat16 0x000A, also subnormal
    state = {"var": _uniform(0x3F800000, n, dtype), "m": _uniform(0, n, dtype),
             "v": _uniform(0, n, dtype), "vhat": _uniform(subnormal, n, dtype)}
    if rounding == "kahan" and dtype == tf.bfloat16:
        state["compensation"] = tf.zeros([n], tf.bfloat16)
    kernel_vars, reference_vars = _variables(state), _variables(state)
    gradient = tf.zeros([n], tf.float32)
    _apply(ops, AMSGRAD_WD, kernel_vars, gradient, rounding, 0)
    _apply(reference, AMSGRAD_WD, reference_vars, gradient, rounding, 0)
    for role in state:
        assert_bits_equal(kernel_vars[role], reference_vars[role], role)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
def test_lion_sign_of_a_zero_matches_reference(device, dtype, rounding):
    """Lion's update is -lr * sign(c); with c = -0.0 the two sides disagree.

    c = m * beta_1 + g * (1 - beta_1) is -0.0 when both terms are -0.0, e.g.
    for m = g = -0.0. The reference takes tf.sign(-0.0) = +0.0 (as Keras's
    Lion does), so delta = -(lr * +0.0) = -0.0 and a -0.0 weight stays -0.0;
    the kernel's SignKeepNan returns c itself, -0.0, so delta = +0.0 and the
    weight becomes +0.0.
    """
    n = 37
    state = {"var": _uniform(0x80000000, n, dtype), "m": _uniform(0x80000000, n, dtype)}
    if rounding == "kahan" and dtype == tf.bfloat16:
        state["compensation"] = tf.zeros([n], tf.bfloat16)
    kernel_vars, reference_vars = _variables(state), _variables(state)
    gradient = _uniform(0x80000000, n, tf.float32)
    _apply(ops, LION_VARIANTS[0], kernel_vars, gradient, rounding, 0)
    _apply(reference, LION_VARIANTS[0], reference_vars, gradient, rounding, 0)
    for role in state:
        assert_bits_equal(kernel_vars[role], reference_vars[role], role)
