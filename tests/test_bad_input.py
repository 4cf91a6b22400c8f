"""Bad input raises InvalidArgumentError naming the input, and writes nothing.

Every case is tried through the Python API (``tf_bf16.ops``) and, where the
Python side could catch it, also through the raw generated op functions of the
loaded library (``tf_bf16._loader.load().tf_bf16_resource_apply_sgd`` ...),
which bypass every Python check: the kernels must check too. Value checks
(a NaN learning rate, an out-of-range index) are made with the value passed
as a run-time tensor inside a ``tf.function``, where no Python check can see
it. After each refused call every variable of the call -- weight, optimizer
slots, Kahan compensation -- must hold exactly the bits it held before.

A NaN or Inf *gradient* is not an error: it propagates as IEEE arithmetic
does (last tests).
"""

import numpy as np
import pytest
import tensorflow as tf

from conftest import DTYPES, assert_bits_equal
from tf_bf16 import ROUNDINGS
from tf_bf16 import _loader
from tf_bf16 import ops

SHAPE = (5, 3)
OPTIMIZERS = ("assign_add", "sgd", "momentum", "adam", "amsgrad")
UPDATERS = ("sgd", "momentum", "adam", "amsgrad")  # take hyperparameters / sparse grads


def _lib():
    return _loader.load()


def _i64(x):
    return tf.constant(x, tf.int64)


def _f32(x):
    return tf.constant(x, tf.float32)


# ---------------------------------------------------------------------------
# State, snapshots, calls.

def _state(optimizer, dtype, rounding, shape=SHAPE, seed=0):
    """Variables of one update: role -> tf.Variable (weight, slots, compensation)."""
    rng = np.random.default_rng(seed)

    def variable(role, scale=1.0, positive=False, vdtype=dtype):
        values = rng.standard_normal(shape).astype(np.float32) * scale
        if positive:
            values = np.abs(values)
        return tf.Variable(tf.cast(values, vdtype), name=role)

    state = {"var": variable("var")}
    if optimizer == "momentum":
        state["accum"] = variable("accum", 0.1)
    if optimizer in ("adam", "amsgrad"):
        state["m"] = variable("m", 0.1)
        state["v"] = variable("v", 0.01, positive=True)
    if optimizer == "amsgrad":
        state["vhat"] = variable("vhat", 0.01, positive=True)
    if rounding == "kahan" and dtype == tf.bfloat16:
        state["compensation"] = variable("compensation", 1e-3, vdtype=tf.bfloat16)
    return state


def _snapshot(state):
    return {role: tf.identity(v.read_value()) for role, v in state.items()}


def _assert_untouched(state, before):
    for role, variable in state.items():
        assert_bits_equal(variable, before[role], f"{role} was modified by a refused call")


def _gradient(shape=SHAPE, dtype=tf.float32, value=0.5):
    return tf.fill(shape, tf.constant(value, dtype))


def _call(optimizer, state, gradient, rounding, **kwargs):
    """The Python API call of `optimizer` on `state`; kwargs override arguments."""
    comp = state.get("compensation")
    if optimizer == "assign_add":
        args = dict(rounding=rounding, compensation=comp, seed=1, step=2, var_id=3)
        args.update(kwargs)
        return ops.rounded_assign_add(state["var"], gradient, **args)
    if optimizer in ("sgd", "momentum"):
        args = dict(learning_rate=0.1, momentum=0.9 if optimizer == "momentum" else 0.0,
                    accumulator=state.get("accum"), rounding=rounding, compensation=comp,
                    seed=1, step=2, var_id=3)
        args.update(kwargs)
        return ops.apply_sgd(state["var"], gradient, **args)
    args = dict(learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-7, step=2,
                vhat=state.get("vhat"), rounding=rounding, compensation=comp, seed=1,
                var_id=3)
    args.update(kwargs)
    return ops.apply_adam(state["var"], gradient, state["m"], state["v"], **args)


def _raw_call(optimizer, state, gradient, rounding, T=None, indices=None, **overrides):
    """The raw generated op function, no Python checks; overrides replace op inputs."""
    lib = _lib()
    T = T or tf.as_dtype(state["var"].dtype)
    comp = [state["compensation"].handle] if "compensation" in state else []
    common = dict(var=state["var"].handle, compensation=comp, seed=_i64(1), step=_i64(2),
                  var_id=_i64(3), T=T, rounding=rounding)
    if optimizer == "assign_add":
        args = dict(common, delta=gradient)
        args.update(overrides)
        return lib.tf_bf16_resource_rounded_assign_add(**args)
    if optimizer in ("sgd", "momentum"):
        args = dict(common, accum=[state["accum"].handle] if "accum" in state else [],
                    lr=_f32(0.1), grad=gradient,
                    momentum=_f32(0.9 if optimizer == "momentum" else 0.0),
                    weight_decay=_f32(0.0))
        if indices is not None:
            args["indices"] = indices
        args.update(overrides)
        if indices is not None:
            return lib.tf_bf16_resource_sparse_apply_sgd(**args)
        return lib.tf_bf16_resource_apply_sgd(**args)
    args = dict(common, m=state["m"].handle, v=state["v"].handle,
                vhat=[state["vhat"].handle] if "vhat" in state else [],
                beta1_power=_f32(0.9 ** 3), beta2_power=_f32(0.999 ** 3), lr=_f32(0.01),
                one_minus_beta1=_f32(0.1), one_minus_beta2=_f32(0.001), epsilon=_f32(1e-7),
                weight_decay=_f32(0.0), grad=gradient)
    if indices is not None:
        args["indices"] = indices
    args.update(overrides)
    if indices is not None:
        return lib.tf_bf16_resource_sparse_apply_adam(**args)
    return lib.tf_bf16_resource_apply_adam(**args)


def _expect_invalid(state, fn, *names):
    """fn() raises InvalidArgumentError naming one of `names`; state is untouched."""
    before = _snapshot(state)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        fn()
    message = info.value.message
    assert any(name in message for name in names), (
        f"message does not name any of {names}: {message}")
    _assert_untouched(state, before)
    return message


# ---------------------------------------------------------------------------
# Dtypes.

@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_float16_variable(device, optimizer, rounding):
    state = _state(optimizer, tf.float16, "nearest")
    _expect_invalid(state, lambda: _call(optimizer, state, _gradient(), rounding),
                    "'variable'")
    # The kernel, told T=float32 or bfloat16, finds a half variable (and, for
    # Kahan with T=bfloat16, the compensation buffer it asks for).
    for T in DTYPES:
        if rounding == "kahan" and T == tf.bfloat16:
            state["compensation"] = tf.Variable(tf.zeros(SHAPE, tf.bfloat16))
        else:
            state.pop("compensation", None)
        _expect_invalid(state, lambda: _raw_call(optimizer, state, _gradient(), rounding,
                                                 T=T), "'var'")


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_float64_gradient(device, optimizer, dtype, rounding):
    state = _state(optimizer, dtype, rounding)
    grad = _gradient(dtype=tf.float64)
    _expect_invalid(state, lambda: _call(optimizer, state, grad, rounding),
                    "'gradient'", "'delta'")
    # Tgrad / Tdelta only allow float32 and bfloat16.
    _expect_invalid(state, lambda: _raw_call(optimizer, state, grad, rounding),
                    "'Tgrad'", "'Tdelta'")


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gradient_shape_mismatch(device, optimizer, dtype, rounding):
    state = _state(optimizer, dtype, rounding)

    # Traced with an unknown gradient shape: only the kernel can tell.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def update(gradient):
        _call(optimizer, state, gradient, rounding)

    for shape in [(5, 4), (15,), (3, 5), ()]:
        grad = _gradient(shape)
        _expect_invalid(state, lambda: _call(optimizer, state, grad, rounding),
                        "'gradient'", "'delta'")
        _expect_invalid(state, lambda: _raw_call(optimizer, state, grad, rounding),
                        "'grad'", "'delta'")
        _expect_invalid(state, lambda: update(grad), "'grad'", "'delta'")


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer", ["momentum", "adam", "amsgrad"])
def test_slot_shape_and_dtype_mismatch(device, optimizer, dtype, rounding):
    other_dtype = tf.float32 if dtype == tf.bfloat16 else tf.bfloat16
    slots = [role for role in _state(optimizer, dtype, rounding)
             if role in ("accum", "m", "v", "vhat")]
    python_name = {"accum": "accumulator", "m": "m", "v": "v", "vhat": "vhat"}
    for role in slots:
        for bad in (tf.Variable(tf.zeros((5, 4), dtype), name="bad_shape"),
                    tf.Variable(tf.zeros((15,), dtype), name="bad_rank"),
                    tf.Variable(tf.zeros(SHAPE, other_dtype), name="bad_dtype"),
                    tf.Variable(tf.zeros(SHAPE, tf.float16), name="half")):
            state = _state(optimizer, dtype, rounding)
            good = state[role]
            state[role] = bad
            kwargs = {python_name[role]: bad}
            if optimizer in ("adam", "amsgrad") and role in ("m", "v"):
                call = lambda: ops.apply_adam(  # noqa: E731
                    state["var"], _gradient(), state["m"], state["v"], 0.01,
                    vhat=state.get("vhat"), rounding=rounding,
                    compensation=state.get("compensation"))
            else:
                call = lambda: _call(optimizer, state, _gradient(), rounding,  # noqa: E731
                                     **kwargs)
            state["good_" + role] = good  # must stay untouched as well
            _expect_invalid(state, call, f"'{python_name[role]}'")
            _expect_invalid(state, lambda: _raw_call(optimizer, state, _gradient(), rounding),
                            f"'{role}'")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_compensation_shape_and_dtype_mismatch(device, optimizer):
    for bad in (tf.Variable(tf.zeros((5, 4), tf.bfloat16)),
                tf.Variable(tf.zeros(SHAPE, tf.float32)),
                tf.Variable(tf.zeros(SHAPE, tf.float16))):
        state = _state(optimizer, tf.bfloat16, "kahan")
        state["compensation"] = bad
        _expect_invalid(state, lambda: _call(optimizer, state, _gradient(), "kahan"),
                        "'compensation'")
        _expect_invalid(state, lambda: _raw_call(optimizer, state, _gradient(), "kahan"),
                        "'compensation'")


# ---------------------------------------------------------------------------
# Hyperparameters.

@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer", UPDATERS)
def test_non_scalar_learning_rate(device, optimizer, dtype, rounding):
    state = _state(optimizer, dtype, rounding)
    lr = tf.constant([0.1, 0.2])
    _expect_invalid(state, lambda: _call(optimizer, state, _gradient(), rounding,
                                         learning_rate=lr), "'learning_rate'")
    # Eager raw op: no shape function runs; the kernel refuses it.
    _expect_invalid(state, lambda: _raw_call(optimizer, state, _gradient(), rounding, lr=lr),
                    "'lr'")

    # Traced with an unknown shape, so that neither Python nor shape inference can tell.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def update(learning_rate):
        _call(optimizer, state, _gradient(), rounding, learning_rate=learning_rate)

    _expect_invalid(state, lambda: update(lr), "'lr'")


# (optimizer, Python argument, kernel input, bad values)
BAD_SCALARS = [
    ("sgd", "learning_rate", "'lr'", [np.nan, -0.1, np.inf, -np.inf]),
    ("momentum", "learning_rate", "'lr'", [np.nan, -1e-30, np.inf]),
    ("momentum", "momentum", "'momentum'", [np.nan, np.inf, -np.inf]),
    ("momentum", "weight_decay", "'weight_decay'", [np.nan, np.inf]),
    ("adam", "learning_rate", "'lr'", [np.nan, -0.1, np.inf]),
    ("adam", "epsilon", "'epsilon'", [np.nan, -1e-7, np.inf]),
    ("adam", "weight_decay", "'weight_decay'", [np.nan, -np.inf]),
    ("amsgrad", "beta_2", "'beta2", [np.nan, np.inf]),
    # beta_2 = 1 never updates v (stock Keras's bf16 failure); > 1 diverges. The
    # kernel receives 1 - beta_2 (docs/rounding.md 5.3) and names that input.
    ("adam", "beta_2", "'one_minus_beta2'", [1.0, 1.5, -0.5]),
    # beta_1 = NaN makes beta_1 ** (step + 1) NaN; beta_1 = 1 would divide the
    # bias correction by zero.
    ("amsgrad", "beta_1", "'beta1_power'", [np.nan]),
    ("amsgrad", "beta_1", "'one_minus_beta1'", [1.0]),
]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer,argument,input_name,values", BAD_SCALARS,
                         ids=[f"{o}-{a}" for o, a, _, _ in BAD_SCALARS])
def test_bad_hyperparameter_value_at_run_time(device, optimizer, argument, input_name, values,
                                              dtype, rounding):
    state = _state(optimizer, dtype, rounding)

    @tf.function
    def update(value):
        _call(optimizer, state, _gradient(), rounding, **{argument: value})

    for value in values:
        _expect_invalid(state, lambda: update(_f32(value)), input_name)
        # Eagerly, too: there are no value checks in Python to stop it first.
        _expect_invalid(state, lambda: _call(optimizer, state, _gradient(), rounding,
                                             **{argument: value}), input_name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_bad_adam_scalars_through_the_raw_op(device, dtype):
    """Inputs the Python wrapper computes itself (beta powers) checked by the kernel."""
    state = _state("amsgrad", dtype, "stochastic")
    grad = _gradient()
    for name, value in [("beta1_power", 1.0), ("beta1_power", np.nan), ("beta2_power", np.inf),
                        ("one_minus_beta1", np.nan), ("one_minus_beta2", -np.inf),
                        ("one_minus_beta2", 0.0), ("epsilon", -1.0),
                        ("lr", np.nan)]:
        _expect_invalid(state, lambda: _raw_call("amsgrad", state, grad, "stochastic",
                                                 **{name: _f32(value)}), f"'{name}'")
    for name in ("seed", "step", "var_id"):
        _expect_invalid(state, lambda: _raw_call("amsgrad", state, grad, "stochastic",
                                                 **{name: _i64([1, 2])}), f"'{name}'")


# ---------------------------------------------------------------------------
# Uninitialized variables.

class _HandleOnly:
    """What the Python API needs of a variable, around a bare resource handle."""

    def __init__(self, handle, dtype, shape, name):
        self.handle, self.dtype, self.shape, self.name = handle, dtype, shape, name


def _uninitialized(dtype, shape=SHAPE, name="never_assigned"):
    handle = tf.raw_ops.VarHandleOp(dtype=dtype, shape=shape, shared_name=name)
    return _HandleOnly(handle, dtype, tf.TensorShape(shape), name)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_uninitialized_variable(device, optimizer, dtype, rounding):
    roles = list(_state(optimizer, dtype, rounding))
    for role in roles:
        state = _state(optimizer, dtype, rounding)
        vdtype = tf.bfloat16 if role == "compensation" else dtype
        missing = _uninitialized(vdtype, name=f"never_assigned_{role}")
        initialized = {r: v for r, v in state.items() if r != role}
        before = _snapshot(initialized)
        state[role] = missing
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            _raw_call(optimizer, state, _gradient(), rounding)
        assert f"'{role}'" in info.value.message and "never_assigned" in info.value.message
        # Through the Python API, which cannot tell.
        python_state = dict(state)
        if role == "var":
            variable = missing
        else:
            variable = state["var"]
        if optimizer in ("adam", "amsgrad"):
            call = lambda: ops.apply_adam(  # noqa: E731
                variable, _gradient(), python_state["m"], python_state["v"], 0.01,
                vhat=python_state.get("vhat"), rounding=rounding,
                compensation=python_state.get("compensation"))
        elif optimizer == "assign_add":
            call = lambda: ops.rounded_assign_add(  # noqa: E731
                variable, _gradient(), rounding=rounding,
                compensation=python_state.get("compensation"))
        else:
            call = lambda: ops.apply_sgd(  # noqa: E731
                variable, _gradient(), 0.1, momentum=0.9 if "accum" in state else 0.0,
                accumulator=python_state.get("accum"), rounding=rounding,
                compensation=python_state.get("compensation"))
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            call()
        assert f"'{role}'" in info.value.message
        _assert_untouched(initialized, before)


# ---------------------------------------------------------------------------
# Sparse indices.

BAD_INDEX_LISTS = [
    [-1],
    [5],
    [0, 2, -1],
    [1, 5],
    [0, 1, 2, 3, 4, 4, 2, 7],           # bad index after valid (and duplicate) ones
    [4, 3, 2, 1, 0, -2147483648],
]


@pytest.mark.parametrize("index_dtype", [tf.int32, tf.int64], ids=lambda d: d.name)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer", UPDATERS)
def test_out_of_range_sparse_index(device, optimizer, dtype, rounding, index_dtype):
    state = _state(optimizer, dtype, rounding)

    @tf.function(input_signature=[tf.TensorSpec([None], index_dtype),
                                  tf.TensorSpec([None, SHAPE[1]], tf.float32)])
    def update(indices, values):
        _call(optimizer, state, tf.IndexedSlices(values, indices), rounding)

    for index_list in BAD_INDEX_LISTS + ([[2, 2**40]] if index_dtype == tf.int64 else []):
        indices = tf.constant(index_list, index_dtype)
        values = tf.ones((len(index_list), SHAPE[1]))
        gradient = tf.IndexedSlices(values, indices)
        message = _expect_invalid(state, lambda: _call(optimizer, state, gradient, rounding),
                                  "'indices'")
        bad = [k for k, i in enumerate(index_list) if not 0 <= i < SHAPE[0]][0]
        assert f"'indices'[{bad}]" in message  # says which one
        _expect_invalid(state, lambda: _raw_call(optimizer, state, values, rounding,
                                                 indices=indices), "'indices'")
        _expect_invalid(state, lambda: update(indices, values), "'indices'")


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer", UPDATERS)
def test_malformed_sparse_gradient(device, optimizer, dtype, rounding):
    state = _state(optimizer, dtype, rounding)
    # Values rows != number of indices; wrong row shape; indices not a vector.
    cases = [(tf.ones((3, 3)), tf.constant([0, 1], tf.int64), "'grad'"),
             (tf.ones((2, 4)), tf.constant([0, 1], tf.int64), "'grad'"),
             (tf.ones((2, 3)), tf.constant([[0], [1]], tf.int64), "'indices'")]
    for values, indices, name in cases:
        _expect_invalid(state, lambda: _raw_call(optimizer, state, values, rounding,
                                                 indices=indices), name)
    _expect_invalid(state, lambda: _call(optimizer, state, tf.IndexedSlices(
        tf.ones((2, 4)), tf.constant([0, 1])), rounding), "'gradient.values'")
    _expect_invalid(state, lambda: _call(optimizer, state, tf.IndexedSlices(
        tf.ones((2, 3)), tf.constant([0.0, 1.0])), rounding), "indices")
    # A sparse gradient for a scalar variable.
    scalar = _state(optimizer, dtype, rounding, shape=())
    _expect_invalid(scalar, lambda: _call(optimizer, scalar, tf.IndexedSlices(
        tf.ones((1,)), tf.constant([0])), rounding), "'gradient' is sparse")
    _expect_invalid(scalar, lambda: _raw_call(optimizer, scalar, tf.ones((1,)), rounding,
                                              indices=tf.constant([0])), "'var'")


# ---------------------------------------------------------------------------
# Rounding and compensation.

@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_kahan_without_compensation(device, optimizer):
    state = _state(optimizer, tf.bfloat16, "nearest")  # no compensation buffer
    _expect_invalid(state, lambda: _call(optimizer, state, _gradient(), "kahan"),
                    "compensation")
    _expect_invalid(state, lambda: _raw_call(optimizer, state, _gradient(), "kahan"),
                    "compensation")


# Every (rounding, dtype) but ("kahan", bfloat16), the one that uses a compensation buffer.
@pytest.mark.parametrize("rounding,dtype", [
    (r, d) for r in ROUNDINGS for d in DTYPES if not (r == "kahan" and d == tf.bfloat16)],
    ids=lambda p: p.name if isinstance(p, tf.DType) else p)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_compensation_where_it_is_not_used(device, optimizer, rounding, dtype):
    state = _state(optimizer, dtype, rounding)
    state["compensation"] = tf.Variable(tf.zeros(SHAPE, tf.bfloat16), name="compensation")
    _expect_invalid(state, lambda: _call(optimizer, state, _gradient(), rounding),
                    "compensation")
    _expect_invalid(state, lambda: _raw_call(optimizer, state, _gradient(), rounding),
                    "compensation")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_unknown_rounding(device, optimizer, dtype):
    state = _state(optimizer, dtype, "nearest")
    before = _snapshot(state)
    for rounding in ("Nearest", "round", "", None):
        with pytest.raises(ValueError, match="rounding"):
            _call(optimizer, state, _gradient(), rounding)
    _expect_invalid(state, lambda: _raw_call(optimizer, state, _gradient(), "truncate"),
                    "'rounding'")
    _assert_untouched(state, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_nesterov_without_accumulator(device, dtype):
    state = _state("sgd", dtype, "nearest")
    _expect_invalid(state, lambda: ops.apply_sgd(state["var"], _gradient(), 0.1,
                                                 nesterov=True), "accum")
    _expect_invalid(state, lambda: _raw_call("sgd", state, _gradient(), "nearest",
                                             use_nesterov=True), "'accum'")


def test_stochastic_round_refuses_other_dtypes(device):
    for dtype in (tf.float16, tf.float64, tf.bfloat16):
        with pytest.raises(tf.errors.InvalidArgumentError, match="'x'"):
            ops.stochastic_round(tf.ones([3], dtype), seed=1)
    with pytest.raises(tf.errors.InvalidArgumentError):
        _lib().tf_bf16_stochastic_round(x=tf.ones([3], tf.float64), seed=_i64(1),
                                        step=_i64(0), var_id=_i64(0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="'seed'"):
        _lib().tf_bf16_stochastic_round(x=tf.ones([3]), seed=_i64([1, 2]), step=_i64(0),
                                        var_id=_i64(0))


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_lion_bad_input(device, dtype, rounding):
    """apply_lion, added after the others: the same checks, compactly."""
    lib = _lib()
    state = _state("momentum", dtype, rounding)
    state["m"] = state.pop("accum")
    comp = state.get("compensation")

    def call(gradient=None, m=None, **kwargs):
        args = dict(learning_rate=0.01, beta_1=0.9, beta_2=0.99, rounding=rounding,
                    compensation=comp, seed=1, step=2, var_id=3)
        args.update(kwargs)
        return ops.apply_lion(state["var"], _gradient() if gradient is None else gradient,
                              state["m"] if m is None else m, **args)

    def raw_call(**overrides):
        args = dict(var=state["var"].handle, m=state["m"].handle,
                    compensation=[comp.handle] if comp is not None else [], lr=_f32(0.01),
                    beta1=_f32(0.9), beta2=_f32(0.99), weight_decay=_f32(0.0),
                    grad=_gradient(), seed=_i64(1), step=_i64(2), var_id=_i64(3),
                    T=tf.as_dtype(state["var"].dtype), rounding=rounding)
        args.update(overrides)
        return lib.tf_bf16_resource_apply_lion(**args)

    @tf.function
    def update(learning_rate, beta_1, weight_decay):
        call(learning_rate=learning_rate, beta_1=beta_1, weight_decay=weight_decay)

    for lr, beta_1, wd, name in [(np.nan, 0.9, 0.0, "'lr'"), (-0.01, 0.9, 0.0, "'lr'"),
                                 (0.01, np.inf, 0.0, "'beta1'"),
                                 (0.01, 0.9, np.nan, "'weight_decay'")]:
        _expect_invalid(state, lambda: update(_f32(lr), _f32(beta_1), _f32(wd)), name)
    _expect_invalid(state, lambda: raw_call(beta2=_f32(np.nan)), "'beta2'")
    _expect_invalid(state, lambda: call(gradient=_gradient(dtype=tf.float64)), "'gradient'")
    _expect_invalid(state, lambda: call(gradient=_gradient((3, 5))), "'gradient'")
    _expect_invalid(state, lambda: raw_call(grad=_gradient((3, 5))), "'grad'")
    _expect_invalid(state, lambda: call(m=tf.Variable(tf.zeros((5, 4), dtype))), "'m'")
    _expect_invalid(state, lambda: raw_call(m=tf.Variable(tf.zeros(SHAPE, tf.float16)).handle),
                    "'m'")
    missing = _uninitialized(dtype, name="never_assigned_lion_m")
    _expect_invalid(state, lambda: raw_call(m=missing.handle), "'m'")
    _expect_invalid(state, lambda: call(m=missing), "'m'")
    _expect_invalid(state, lambda: raw_call(T=tf.float32 if dtype == tf.bfloat16
                                            else tf.bfloat16, compensation=[]),
                    "'var'", "compensation")


# ---------------------------------------------------------------------------
# NaN and Inf gradients are data, not errors.

@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"grad_{d.name}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_nan_gradient_gives_nan_weight(device, optimizer, dtype, gdtype, rounding):
    """A NaN gradient element makes that weight NaN: not clipped, not skipped.

    The other elements are updated as usual, exactly as if they had been
    updated alone (elementwise update).
    """
    state = _state(optimizer, dtype, rounding)
    reference_state = _state(optimizer, dtype, rounding)  # same seed: same values
    g = np.full(SHAPE, 0.5, np.float32)
    g[1, 2] = np.nan
    g[3, 0] = -np.nan
    nan_mask = np.isnan(g)
    _call(optimizer, state, tf.cast(g, gdtype), rounding)
    weight = state["var"].numpy().astype(np.float32)
    assert np.isnan(weight[nan_mask]).all(), weight
    assert np.isfinite(weight[~nan_mask]).all(), weight
    # The finite elements equal an update with those elements' NaNs replaced by
    # any finite value, element for element (the NaN stays where it was).
    _call(optimizer, reference_state, tf.cast(np.where(nan_mask, 0.5, g), gdtype), rounding)
    for role in state:
        mine = state[role].numpy().astype(np.float32)[~nan_mask]
        theirs = reference_state[role].numpy().astype(np.float32)[~nan_mask]
        assert_bits_equal(mine, theirs, f"{role}, elements with a finite gradient")
    if optimizer in ("momentum", "adam", "amsgrad"):
        for role in ("accum", "m", "v"):
            if role in state:
                assert np.isnan(state[role].numpy().astype(np.float32)[nan_mask]).all()
    # A second step with a finite gradient keeps the NaN weight NaN.
    _call(optimizer, state, tf.cast(np.full(SHAPE, 0.25, np.float32), gdtype), rounding,
          **({} if optimizer == "assign_add" else {"step": 3}))
    assert np.isnan(state["var"].numpy().astype(np.float32)[nan_mask]).all()


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"var_{d.name}")
def test_inf_gradient_follows_ieee_arithmetic(device, dtype, rounding):
    """SGD: w - lr * (+Inf) = -Inf. Adam: m / sqrt(v) = Inf / Inf = NaN."""
    g = np.zeros(SHAPE, np.float32)
    g[0, 0], g[4, 2] = np.inf, -np.inf
    state = _state("sgd", dtype, rounding)
    _call("sgd", state, tf.constant(g), rounding)
    weight = state["var"].numpy().astype(np.float32)
    assert weight[0, 0] == -np.inf and weight[4, 2] == np.inf
    state = _state("adam", dtype, rounding)
    _call("adam", state, tf.constant(g), rounding)
    weight = state["var"].numpy().astype(np.float32)
    assert np.isnan(weight[0, 0]) and np.isnan(weight[4, 2])
    assert np.isinf(state["v"].numpy().astype(np.float32)[0, 0])
