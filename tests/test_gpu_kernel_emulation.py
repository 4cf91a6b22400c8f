"""The CUDA kernels' per-thread code, emulated on the host, equals the CPU kernels BIT FOR BIT.

cc/kernels/bf16_update_kernels.cu.h writes the work of one GPU thread as a
__host__ __device__ function of (thread index, thread count); its launchers
pick the kernel (vectorised chunks of 8 elements or one element at a time,
template flags) and its HostEmulator runs those functions on the host for any
grid size. cc/harness/emulation.cc exposes that through ctypes. These tests
run every op, rounding, variable and gradient dtype, dense and sparse (with
duplicate indices), on sizes around the vector width and a million-element
tensor, for several emulated grids (1 thread, odd counts, a full H200 grid),
thread orders, aligned and unaligned tensors, and compare every output bit
with TensorFlow running the CPU kernels (tf_bf16.ops) on the same inputs.

What this cannot show is how nvcc compiles the same code for the GPU (FMA
contraction, denormal flushing): the H200 harness (cc/harness/) checks that.
2^32-element blocks: no test can hold 2^32 elements here, so one test
emulates a window of a variable across the block boundary at 2^32
(HostEmulator.first_index) and compares it with the plain host math, which
keys each element by its own index's high 32 bits, as the CPU kernels do.
"""

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_bits_equal, bits
from tf_bf16 import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "cc", "harness", "emulation.cc")
ROUNDINGS = ("nearest", "stochastic", "kahan")
ROUNDING_CODE = {name: k for k, name in enumerate(ROUNDINGS)}
OPS = {"round": 0, "assign_add": 1, "sgd": 2, "adam": 3, "lion": 4}

SEED, STEP, VAR_ID = 2**33 + 7, 5, -3
LR, MOMENTUM, WEIGHT_DECAY = 0.0137, 0.9, 0.04
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7
LION_BETA_1, LION_BETA_2 = 0.9, 0.99
# Emulated grids (threads, reverse order): one thread does everything; odd
# counts leave threads without a chunk or with a share of the tail; 270336 =
# 132 multiprocessors x 8 blocks x 256 threads, the GPU launcher's grid on an
# H200. Each grid runs with one chunk per trip and with the GPU default of
# two (DenseThread's K: two chunks loaded before either is computed).
GEOMETRIES = [(1, False), (3, True), (1792, False), (270336, True)]
CHUNKS_PER_TRIP = (1, 2)


class Call(ctypes.Structure):
    """Mirror of TfBf16EmulatedCall (cc/harness/emulation.cc)."""

    _fields_ = [
        ("op", ctypes.c_int32), ("rounding", ctypes.c_int32), ("var_bf16", ctypes.c_int32),
        ("grad_bf16", ctypes.c_int32),
        ("var", ctypes.c_void_p), ("slot1", ctypes.c_void_p), ("slot2", ctypes.c_void_p),
        ("slot3", ctypes.c_void_p), ("compensation", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("n", ctypes.c_int64), ("indices", ctypes.c_void_p), ("num_indices", ctypes.c_int64),
        ("row_size", ctypes.c_int64),
        ("lr", ctypes.c_float), ("momentum", ctypes.c_float), ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float), ("epsilon", ctypes.c_float),
        ("weight_decay", ctypes.c_float), ("beta1_power", ctypes.c_float),
        ("beta2_power", ctypes.c_float),
        ("nesterov", ctypes.c_int32), ("reverse_order", ctypes.c_int32),
        ("seed", ctypes.c_int64), ("step", ctypes.c_int64), ("var_id", ctypes.c_int64),
        ("threads", ctypes.c_uint64), ("allow_vector", ctypes.c_int32),
        ("chunks_per_trip", ctypes.c_int32), ("first_index", ctypes.c_int64),
        ("one_minus_beta1", ctypes.c_float), ("one_minus_beta2", ctypes.c_float),
    ]


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """cc/harness/emulation.cc, compiled for this test session."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    assert compiler, "a C++ compiler (g++) is needed to build the kernel emulation"
    library = tmp_path_factory.mktemp("emulation") / "emulation.so"
    subprocess.run([compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off",
                    "-fno-math-errno", "-Wno-unknown-pragmas", SOURCE, "-o", str(library)],
                   check=True)
    lib = ctypes.CDLL(str(library))
    lib.tf_bf16_emulate.argtypes = [ctypes.POINTER(Call)]
    lib.tf_bf16_reference.argtypes = [ctypes.POINTER(Call)]
    lib.tf_bf16_emulated_call_size.restype = ctypes.c_int64
    assert lib.tf_bf16_emulated_call_size() == ctypes.sizeof(Call)
    return lib


# ---------------------------------------------------------------------------
# Inputs: every kind of value mixed (normal, huge, tiny and subnormal, signed
# zeros, NaNs with payloads, infinities), as float32 bit patterns.

SPECIAL_BITS = np.array([0x7FC00000, 0xFFC12345, 0x7F810000, 0x7F800001, 0x7F800000,
                         0xFF800000, 0x00000001, 0x000AE398, 0x80400000, 0x007FFFFF,
                         0x00800000, 0x80000000, 0x00000000, 0x7F7FFFFF, 0xFF7F0000],
                        np.uint32)


def _values(rng, n, positive=False):
    out = rng.standard_normal(n).astype(np.float32)
    kind = rng.random(n)
    out[kind < 0.1] *= np.float32(1e-3)
    huge = (kind >= 0.1) & (kind < 0.15)
    out[huge] = rng.uniform(1e37, 3.3e38, int(huge.sum())).astype(np.float32)
    special = kind >= 0.9
    out[special] = rng.choice(SPECIAL_BITS, int(special.sum())).view(np.float32)
    if positive:
        out = np.abs(out)
    return out


def _storage(values, bf16):
    """Values as stored: float32, or bfloat16 as the top 16 bits (uint16)."""
    return (values.view(np.uint32) >> 16).astype(np.uint16) if bf16 else values.copy()


def _as_tf(stored):
    if stored.dtype == np.uint16:
        return tf.bitcast(tf.constant(stored), tf.bfloat16)
    return tf.constant(stored)


class Buffer:
    """A copy of `stored` in memory aligned to 64 bytes (plus `offset` bytes)."""

    def __init__(self, stored, offset=0):
        raw = np.zeros(stored.nbytes + 128, np.uint8)
        start = (-raw.ctypes.data) % 64 + offset
        self.array = raw[start:start + stored.nbytes].view(stored.dtype)
        self.array[...] = stored.reshape(-1)
        self._raw = raw

    @property
    def address(self):
        return self.array.ctypes.data


def _roles(op, momentum=True, amsgrad=False):
    if op == "sgd":
        return ["accum"] if momentum else []
    if op == "adam":
        return ["m", "v"] + (["vhat"] if amsgrad else [])
    if op == "lion":
        return ["m"]
    return []


class Case:
    """One update: its initial state and gradient, run by TF and by the emulation."""

    def __init__(self, op, shape, var_bf16, grad_bf16, rounding, rng, momentum=True,
                 nesterov=False, amsgrad=False, weight_decay=0.0, indices=None):
        self.op, self.shape, self.rounding = op, shape, rounding
        self.var_bf16, self.grad_bf16 = var_bf16, grad_bf16
        self.momentum, self.nesterov = momentum, nesterov
        self.amsgrad, self.weight_decay = amsgrad, weight_decay
        self.indices = indices
        n = int(np.prod(shape, dtype=np.int64))
        self.n = n
        self.state = {"var": _storage(_values(rng, n), var_bf16)}
        for role in _roles(op, momentum, amsgrad):
            self.state[role] = _storage(_values(rng, n, positive=role in ("v", "vhat")), var_bf16)
        if rounding == "kahan" and var_bf16:
            comp = _values(rng, n)
            comp[np.abs(comp) < 1e30] *= np.float32(1e-3)
            self.state["compensation"] = _storage(comp, True)
        if indices is None:
            grad_shape = shape
        else:
            grad_shape = (len(indices),) + tuple(shape[1:])
        self.grad_shape = grad_shape
        self.grad = _storage(_values(rng, int(np.prod(grad_shape, dtype=np.int64))), grad_bf16)

    def __repr__(self):
        return (f"{self.op} shape={self.shape} var_bf16={self.var_bf16} "
                f"grad_bf16={self.grad_bf16} {self.rounding} momentum={self.momentum} "
                f"nesterov={self.nesterov} amsgrad={self.amsgrad} wd={self.weight_decay} "
                f"indices={None if self.indices is None else len(self.indices)}")

    def run_tensorflow(self, index_dtype=tf.int64):
        """State after the CPU kernel (tf_bf16.ops), role -> stored numpy array."""
        variables = {role: tf.Variable(tf.reshape(_as_tf(value), self.shape))
                     for role, value in self.state.items()}
        grad = tf.reshape(_as_tf(self.grad), self.grad_shape)
        if self.indices is not None:
            grad = tf.IndexedSlices(grad, tf.constant(self.indices, index_dtype),
                                    tf.constant(self.shape, tf.int64))
        common = dict(rounding=self.rounding, compensation=variables.get("compensation"),
                      seed=SEED, var_id=VAR_ID)
        if self.op == "assign_add":
            ops.rounded_assign_add(variables["var"], grad, step=STEP, **common)
        elif self.op == "sgd":
            ops.apply_sgd(variables["var"], grad, LR,
                          momentum=MOMENTUM if self.momentum else 0.0,
                          accumulator=variables.get("accum"), nesterov=self.nesterov,
                          weight_decay=self.weight_decay, step=STEP, **common)
        elif self.op == "adam":
            ops.apply_adam(variables["var"], grad, variables["m"], variables["v"], LR,
                           beta_1=BETA_1, beta_2=BETA_2, epsilon=EPSILON, step=STEP,
                           vhat=variables.get("vhat"), weight_decay=self.weight_decay, **common)
        elif self.op == "lion":
            ops.apply_lion(variables["var"], grad, variables["m"], LR, beta_1=LION_BETA_1,
                           beta_2=LION_BETA_2, weight_decay=self.weight_decay, step=STEP,
                           **common)
        return {role: bits(v).reshape(-1) for role, v in variables.items()}

    def call(self, buffers, grad, indices=None):
        c = Call()
        c.op, c.rounding = OPS[self.op], ROUNDING_CODE[self.rounding]
        c.var_bf16, c.grad_bf16 = int(self.var_bf16), int(self.grad_bf16)
        slot_roles = {"sgd": ["accum"], "adam": ["m", "v", "vhat"], "lion": ["m"]}.get(self.op, [])
        c.var = buffers["var"].address
        for field, role in zip(("slot1", "slot2", "slot3"), slot_roles):
            if role in buffers:
                setattr(c, field, buffers[role].address)
        if "compensation" in buffers:
            c.compensation = buffers["compensation"].address
        c.grad = grad.address
        c.n = self.n
        if indices is not None:
            c.indices, c.num_indices = indices.ctypes.data, len(indices)
            c.row_size = int(np.prod(self.shape[1:], dtype=np.int64))
        c.lr, c.momentum, c.weight_decay = LR, MOMENTUM if self.momentum else 0.0, self.weight_decay
        c.beta1, c.beta2 = (LION_BETA_1, LION_BETA_2) if self.op == "lion" else (BETA_1, BETA_2)
        c.epsilon = EPSILON
        # Adam's constants as tf_bf16.ops computes them (Keras: 1 - beta in Python).
        c.one_minus_beta1, c.one_minus_beta2 = float(np.float32(1 - BETA_1)), float(np.float32(1 - BETA_2))
        powers = tf.pow(tf.constant([BETA_1, BETA_2], tf.float32), float(STEP + 1)).numpy()
        c.beta1_power, c.beta2_power = float(powers[0]), float(powers[1])
        c.nesterov = int(self.nesterov)
        c.seed, c.step, c.var_id = SEED, STEP, VAR_ID
        return c

    def run_emulation(self, lib, threads, reverse, offset=0, allow_vector=True,
                      reference=False, chunks_per_trip=1):
        """State after the emulated GPU kernel (or the plain host math), and the width used."""
        buffers = {role: Buffer(value, offset) for role, value in self.state.items()}
        grad = Buffer(self.grad, offset)
        indices = None if self.indices is None else np.asarray(self.indices, np.int64)
        c = self.call(buffers, grad, indices)
        c.threads, c.reverse_order, c.allow_vector = threads, int(reverse), int(allow_vector)
        c.chunks_per_trip = chunks_per_trip
        width = (lib.tf_bf16_reference if reference else lib.tf_bf16_emulate)(ctypes.byref(c))
        assert width >= 0, f"the emulation does not know {self}"
        return {role: b.array.reshape(-1) for role, b in buffers.items()}, width


def _compare(got, want, what):
    assert got.keys() == want.keys()
    for role in want:
        assert_bits_equal(got[role], want[role], f"{what}, {role}")


def _check_geometries(lib, case, geometries=GEOMETRIES):
    want = case.run_tensorflow()
    vector_possible = case.indices is None or int(np.prod(case.shape[1:])) % 8 == 0
    for threads, reverse in geometries:
        for trip in CHUNKS_PER_TRIP:
            got, width = case.run_emulation(lib, threads, reverse, chunks_per_trip=trip)
            _compare(got, want, f"{case}, {threads} threads, {trip} chunks per trip")
            assert width == (8 if vector_possible else 1), f"{case}: chunk width {width}"
    # Unaligned tensors and a forced scalar path take chunks of one element.
    # (An empty numpy array may report any address, so n = 0 is not checked.)
    got, width = case.run_emulation(lib, 7, False, offset=2)
    assert width == 1 or case.n == 0
    _compare(got, want, f"{case}, unaligned")
    got, width = case.run_emulation(lib, 5, True, allow_vector=False)
    assert width == 1
    _compare(got, want, f"{case}, one element per chunk")
    if case.op != "round":
        got, _ = case.run_emulation(lib, 1, False, reference=True)
        _compare(got, want, f"{case}, plain host math")


DENSE_VARIANTS = [
    dict(op="assign_add"),
    dict(op="sgd", momentum=False),
    dict(op="sgd", momentum=False, weight_decay=WEIGHT_DECAY),
    dict(op="sgd"),
    dict(op="sgd", nesterov=True, weight_decay=WEIGHT_DECAY),
    dict(op="adam"),
    dict(op="adam", amsgrad=True, weight_decay=WEIGHT_DECAY),
    dict(op="lion"),
    dict(op="lion", weight_decay=WEIGHT_DECAY),
]
SMALL_SIZES = (0, 1, 3, 4, 5, 8, 9, 37)


def _variant_id(v):
    return "-".join([v["op"]] + [k for k in ("nesterov", "amsgrad") if v.get(k)]
                    + (["plain"] if v.get("momentum") is False else [])
                    + (["wd"] if v.get("weight_decay") else []))


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("grad_bf16", [True, False], ids=["grad_bf16", "grad_f32"])
@pytest.mark.parametrize("var_bf16", [True, False], ids=["var_bf16", "var_f32"])
@pytest.mark.parametrize("variant", DENSE_VARIANTS, ids=_variant_id)
def test_dense_small_sizes(emulation, variant, var_bf16, grad_bf16, rounding):
    rng = np.random.default_rng(11)
    for n in SMALL_SIZES:
        _check_geometries(emulation, Case(shape=(n,), var_bf16=var_bf16, grad_bf16=grad_bf16,
                                          rounding=rounding, rng=rng, **variant))


# A million and three elements: 125000 vector chunks and a tail of three.
@pytest.mark.parametrize("variant,var_bf16,grad_bf16,rounding", [
    (DENSE_VARIANTS[0], True, True, "kahan"),
    (DENSE_VARIANTS[2], True, False, "stochastic"),
    (DENSE_VARIANTS[4], True, True, "stochastic"),
    (DENSE_VARIANTS[4], True, False, "kahan"),
    (DENSE_VARIANTS[4], False, True, "nearest"),
    (DENSE_VARIANTS[5], True, True, "nearest"),
    (DENSE_VARIANTS[6], True, True, "stochastic"),
    (DENSE_VARIANTS[6], True, False, "kahan"),
    (DENSE_VARIANTS[6], False, False, "stochastic"),
    (DENSE_VARIANTS[8], True, True, "stochastic"),
    (DENSE_VARIANTS[8], True, True, "kahan"),
], ids=lambda p: _variant_id(p) if isinstance(p, dict) else str(p))
def test_dense_million_elements(emulation, variant, var_bf16, grad_bf16, rounding):
    rng = np.random.default_rng(12)
    case = Case(shape=(1000003,), var_bf16=var_bf16, grad_bf16=grad_bf16, rounding=rounding,
                rng=rng, **variant)
    _check_geometries(emulation, case, [(1, False), (270336, True), (1000, False)])


@pytest.mark.parametrize("n", SMALL_SIZES + (1000003,))
def test_stochastic_round(emulation, n):
    rng = np.random.default_rng(13)
    x = _values(rng, n)
    want = ops.stochastic_round(tf.constant(x), SEED, STEP, VAR_ID)
    case = Case(op="round", shape=(n,), var_bf16=True, grad_bf16=False, rounding="stochastic",
                rng=rng)
    case.state = {"var": np.zeros(n, np.uint16)}
    case.grad = x
    for threads, reverse in GEOMETRIES:
        for trip in CHUNKS_PER_TRIP:
            got, width = case.run_emulation(emulation, threads, reverse, chunks_per_trip=trip)
            assert width == 8
            assert_bits_equal(got["var"], want,
                              f"stochastic_round n={n}, {threads} threads, {trip} per trip")
    got, width = case.run_emulation(emulation, 3, False, offset=2)
    assert width == 1 or n == 0
    assert_bits_equal(got["var"], want, f"stochastic_round n={n}, unaligned")


# (variable shape, indices): duplicates, empty lists, rows of 1, 3 (one
# element at a time) and 8, 16, 24 elements (vectorised).
SPARSE_CASES = [
    ((10, 3), [3, 0, 3, 9, 3, 5, 9, 9, 1]),
    ((10, 3), []),
    ((11,), [10, 0, 5, 2, 7, 7]),
    ((12, 8), [4, 4, 4, 1, 11, 0, 4]),
    ((7, 2, 8), [6, 1, 1, 0, 6]),
    ((300, 24), list(np.random.default_rng(3).integers(0, 300, 1000))),
]
SPARSE_VARIANTS = [
    dict(op="sgd", momentum=False),
    dict(op="sgd"),
    dict(op="sgd", nesterov=True, weight_decay=WEIGHT_DECAY),
    dict(op="adam"),
    dict(op="adam", amsgrad=True, weight_decay=WEIGHT_DECAY),
]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("var_bf16,grad_bf16", [(True, True), (True, False), (False, True),
                                                (False, False)],
                         ids=["bf16_bf16", "bf16_f32", "f32_bf16", "f32_f32"])
@pytest.mark.parametrize("variant", SPARSE_VARIANTS, ids=_variant_id)
def test_sparse_with_duplicates(emulation, variant, var_bf16, grad_bf16, rounding):
    rng = np.random.default_rng(14)
    for shape, index_list in SPARSE_CASES:
        case = Case(shape=shape, var_bf16=var_bf16, grad_bf16=grad_bf16, rounding=rounding,
                    rng=rng, indices=[int(i) for i in index_list], **variant)
        want32 = case.run_tensorflow(tf.int32)
        want64 = case.run_tensorflow(tf.int64)
        _compare(want32, want64, f"{case}: int32 vs int64 indices")
        _check_geometries(emulation, case)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("variant", [DENSE_VARIANTS[0], DENSE_VARIANTS[4], DENSE_VARIANTS[6],
                                     DENSE_VARIANTS[8]], ids=_variant_id)
def test_window_across_a_block_boundary(emulation, variant, rounding):
    """Elements 2^32 - 1000 ... 2^32 + 1002 of a variable: emulated kernel == host math.

    The high 32 bits of the flat index select the block keys (docs/rounding.md
    3.3); the emulation computes them once per block and thread, the host
    math once per element. The same window one block further on gives other
    random bits (the block keys matter) and, without random bits, the same
    results.
    """
    rng = np.random.default_rng(15)
    first = 2**32 - 1000
    case = Case(shape=(2003,), var_bf16=True, grad_bf16=True, rounding=rounding, rng=rng,
                **variant)

    def run(first_index, threads, reverse=False, reference=False, allow_vector=True,
            chunks_per_trip=1):
        buffers = {role: Buffer(value) for role, value in case.state.items()}
        grad = Buffer(case.grad)
        c = case.call(buffers, grad)
        # The variable's element 0 would be first_index elements before the window.
        for field in ("var", "slot1", "slot2", "slot3", "compensation", "grad"):
            address = getattr(c, field)
            if address:
                itemsize = (case.grad if field == "grad" else
                            case.state["compensation" if field == "compensation"
                                       else "var"]).itemsize
                setattr(c, field, address - first_index * itemsize)
        c.first_index, c.threads, c.reverse_order = first_index, threads, int(reverse)
        c.allow_vector, c.chunks_per_trip = int(allow_vector), chunks_per_trip
        width = (emulation.tf_bf16_reference if reference else emulation.tf_bf16_emulate)(
            ctypes.byref(c))
        assert width >= 0
        return {role: b.array.copy() for role, b in buffers.items()}

    want = run(first, 1, reference=True)
    for threads, reverse in [(1, False), (3, True), (270336, False)]:
        _compare(run(first, threads, reverse), want, f"{case} at 2^32 - 1000, {threads} threads")
    _compare(run(first, 3, chunks_per_trip=2), want, f"{case} at 2^32 - 1000, 2 per trip")
    _compare(run(first, 5, allow_vector=False), want, f"{case} at 2^32 - 1000, scalar")
    next_block = run(first + 2**32, 1, reference=True)
    # Random bits round the weight under "stochastic" and the slots under
    # "kahan" too (docs/rounding.md 5).
    random = rounding == "stochastic" or (rounding == "kahan" and _roles(case.op))
    if not random:
        _compare(next_block, want, f"{case}: no random bits, no dependence on the block")
    else:
        assert any(not np.array_equal(bits(next_block[role]), bits(want[role]))
                   for role in want), f"{case}: the same window one block later drew the same bits"
