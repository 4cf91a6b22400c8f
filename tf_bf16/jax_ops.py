"""The tf_bf16 updates in JAX: docs/rounding.md as pure `jax.numpy`/`jax.lax` functions.

For: the JAX backend of the Keras optimizers (tf_bf16.backend.jax calls these
from `update_step`), and any JAX program that wants one update of one array —
a benchmark of the update alone, a hand-written training loop. Every function
takes arrays and returns new arrays (a dict keyed by the argument names it
updates: ``"variable"``, ``"accumulator"``, ``"m"``, ``"v"``, ``"vhat"``,
``"compensation"``); nothing is updated in place. They are `jax.jit`-able, and
under `jit` XLA fuses one update into one elementwise kernel: no custom call.
Same names, arguments and results as `tf_bf16.ops`, bit for bit
(tests/test_jax_ops.py compares them with the TensorFlow CPU kernels).

    update = jax.jit(functools.partial(jax_ops.apply_adam, rounding="kahan", seed=7),
                     donate_argnames=("variable", "m", "v", "compensation"))
    new = update(w, g, m, v, lr, step=t, compensation=c)   # lr, t: arrays (traced)
    w, m, v, c = new["variable"], new["m"], new["v"], new["compensation"]

Donated buffers are reused for the results, so an update of an array of any
size (below 2**32 elements) needs no second copy of its state.

Not for: sparse gradients (JAX differentiates to dense arrays; see
docs/rounding.md, section 9), variables of 2**32 elements or more, and
anything that needs TensorFlow (nothing here imports it).

How the bits stay those of the C++ kernels whatever XLA does on any device
(docs/rounding.md, section 9):

- Every rounding is integer arithmetic on the float's bits
  (`lax.bitcast_convert_type`), and bf16 values are loaded by a 16-bit shift:
  no float32 -> bfloat16 -> float32 conversion exists for XLA's GPU compiler to
  remove (``xla_allow_excess_precision``, on by default).
- Subnormal inputs and results of every float32 operation become signed zero,
  as in the kernels (TensorFlow's CPU threads flush denormals; XLA's GPU
  compiler keeps them by default).
- No multiply is contracted into a fused multiply-add (XLA's CPU compiler
  and LLVM's NVPTX backend both do this by default): every product passes
  through integer operations — that flush, then an XOR with a zero computed
  at run time from a traced hyperparameter — before it is added, so the
  compiler never sees a multiply feeding an add.
- Scalars computed per call (Adam's bias correction) are fenced with
  `lax.optimization_barrier`, so they are computed once as scalars, not
  re-evaluated inside the vectorized elementwise loop.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tf_bf16._spec import CANONICAL_NAN_BF16
from tf_bf16._spec import CANONICAL_NAN_FLOAT32
from tf_bf16._spec import ROUNDINGS
from tf_bf16._spec import SECOND_HASH_CONSTANT
from tf_bf16._spec import STREAM_KEY_FINAL_WORD
from tf_bf16._spec import STREAM_KEY_INIT

__all__ = [
    "stochastic_round",
    "rounded_assign_add",
    "apply_sgd",
    "apply_adam",
    "apply_lion",
    "moving_average",
]

_MASK32 = 0xFFFFFFFF
_SIGN = np.uint32(0x80000000)
_ABS = np.uint32(0x7FFFFFFF)
_MIN_NORMAL = np.uint32(0x00800000)
_INF = np.uint32(0x7F800000)
_LOW16 = np.uint32(0x7FFF)
_HIGH16 = np.uint32(0xFFFF0000)
_MAX_ELEMENTS = 1 << 32


# ---------------------------------------------------------------------------
# Random bits (docs/rounding.md, section 3)


def _mix32_int(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def mix32(x):
    """lowbias32 on uint32 arrays (modulo 2**32): x ^= x>>16; x *= 0x7feb352d; ..."""
    x = jnp.asarray(x, jnp.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _halves(value, role):
    """(low, high) 32-bit halves of a signed 64-bit integer scalar.

    Python integers stay Python integers (the key is then computed once, in
    Python); arrays (a traced step) give uint32 arrays."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"'{role}' must be an integer, got a bool.")
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if not -(1 << 63) <= value < (1 << 63):
            raise ValueError(f"'{role}' = {value} does not fit a signed 64-bit integer.")
        value &= (1 << 64) - 1
        return value & _MASK32, value >> 32
    value = jnp.asarray(value)
    if value.ndim != 0:
        raise ValueError(f"'{role}' must be a scalar, got shape {value.shape}.")
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"'{role}' must be an integer, got dtype {value.dtype}.")
    signed = jnp.issubdtype(value.dtype, jnp.signedinteger)
    if value.dtype.itemsize <= 4:
        if not signed:
            return value.astype(jnp.uint32), jnp.uint32(0)
        value = value.astype(jnp.int32)
        high = jnp.where(value < 0, np.uint32(_MASK32), np.uint32(0))
        return lax.bitcast_convert_type(value, jnp.uint32), high
    bits = lax.bitcast_convert_type(value.astype(jnp.int64), jnp.uint64) if signed else value
    return ((bits & np.uint64(_MASK32)).astype(jnp.uint32),
            (bits >> np.uint64(32)).astype(jnp.uint32))


def stream_key(seed, step, var_id):
    """The key of one op call's stream: Mix32 absorbs seed, step, var_id (low half
    first), then the final word 0.

    A Python int (as a numpy uint32) when all three are Python integers, else a
    uint32 scalar array."""
    key = STREAM_KEY_INIT
    for role, word in (("seed", seed), ("step", step), ("var_id", var_id)):
        for half in _halves(word, role):
            if isinstance(key, int) and isinstance(half, int):
                key = _mix32_int(key ^ half)
            else:
                half = np.uint32(half) if isinstance(half, int) else half
                key = mix32(jnp.asarray(key, jnp.uint32) ^ half)
    if isinstance(key, int):
        return np.uint32(_mix32_int(key ^ STREAM_KEY_FINAL_WORD))
    return mix32(key ^ np.uint32(STREAM_KEY_FINAL_WORD))


def flat_index(shape):
    """Each element's row-major index in an array of `shape`, as uint32.

    Built from one iota per axis (not an iota reshaped), so that a sharded
    array's elements keep their global indices."""
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) >= _MAX_ELEMENTS:
        raise ValueError(f"tf_bf16.jax_ops updates arrays of fewer than 2**32 elements; got "
                         f"shape {shape}. Split the variable.")
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        term = lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + (term * np.uint32(stride) if stride != 1 else term)
        stride *= shape[axis]
    return index


def element_hash(key, shape):
    """h0 = Mix32(Mix32(index ^ block_key)) for each element of an array of `shape`."""
    # Every index is below 2**32: its high half is 0 and the block key one Mix32 of the key.
    if isinstance(key, (int, np.integer)):
        block_key = np.uint32(_mix32_int(int(key)))
    else:
        block_key = mix32(key)
    return mix32(mix32(flat_index(shape) ^ block_key))


def draws(h0, count):
    """The first `count` (1..4) 16-bit draws [d0, d1, d2, d3] of each element, from
    its h0: the high and low halves of h0, then of h1 = Mix32(h0 ^ C); h1 is
    computed only when a third draw is asked for."""
    result = [h0 >> np.uint32(16), h0 & np.uint32(0xFFFF)]
    if count > 2:
        h1 = mix32(h0 ^ np.uint32(SECOND_HASH_CONSTANT))
        result += [h1 >> np.uint32(16), h1 & np.uint32(0xFFFF)]
    return result[:count]


class _Stream:
    """The random bits of one update call for elements of `shape`."""

    def __init__(self, seed, step, var_id, shape):
        self.seed, self.step, self.var_id, self.shape = seed, step, var_id, shape
        self._h0 = None

    def draw(self, k):
        """Draw k (0..3) of every element."""
        if self._h0 is None:
            self._h0 = element_hash(stream_key(self.seed, self.step, self.var_id), self.shape)
        return draws(self._h0, k + 1)[k]


def _slot_draw(rounding, slot):
    """The draw of optimizer slot `slot` (0: accumulator or m, 1: v, 2: vhat):
    the weight takes d0 under "stochastic", the slots the draws after it."""
    return (1 if rounding == "stochastic" else 0) + slot


# ---------------------------------------------------------------------------
# Rounding float32 -> bfloat16 (section 2), on the bits


def _bits(x):
    return lax.bitcast_convert_type(x, jnp.uint32)


def _float(bits):
    return lax.bitcast_convert_type(bits, jnp.float32)


def _is_nan_bits(bits):
    return (bits & _ABS) > _INF


def _to_bf16(bits16):
    return lax.bitcast_convert_type(bits16.astype(jnp.uint16), jnp.bfloat16)


def _rne_bits(bits):
    return bits + _LOW16 + ((bits >> np.uint32(16)) & np.uint32(1))


def round_nearest(x):
    """float32 -> bfloat16, round to nearest, ties to even; NaN -> canonical NaN."""
    bits = _bits(x)
    rounded = _rne_bits(bits) >> np.uint32(16)
    return _to_bf16(jnp.where(_is_nan_bits(bits), np.uint32(CANONICAL_NAN_BF16), rounded))


def round_stochastic(x, random16):
    """float32 -> bfloat16: add 16 random bits below the kept bits, truncate."""
    bits = _bits(x)
    rounded = (bits + random16) >> np.uint32(16)
    return _to_bf16(jnp.where(_is_nan_bits(bits), np.uint32(CANONICAL_NAN_BF16), rounded))


def _round_nearest_f32(x):
    """round_nearest(x) as a float32 value, without leaving the bits."""
    bits = _bits(x)
    rounded = _rne_bits(bits) & _HIGH16
    return _float(jnp.where(_is_nan_bits(bits), np.uint32(CANONICAL_NAN_BF16 << 16), rounded))


def canonicalize_nan(x):
    """float32: every NaN becomes the canonical quiet NaN 0x7FC00000."""
    bits = _bits(x)
    return _float(jnp.where(_is_nan_bits(bits), np.uint32(CANONICAL_NAN_FLOAT32), bits))


def load(x):
    """A bfloat16 or float32 array as float32, exactly (bf16: a 16-bit shift of the bits)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bfloat16:
        return _float(lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
                      << np.uint32(16))
    if x.dtype == jnp.float32:
        return x
    raise TypeError(f"expected bfloat16 or float32, got {x.dtype}.")


def flush_denormal(x):
    """float32: a subnormal becomes zero of its sign, as x86's FTZ/DAZ modes do."""
    bits = _bits(x)
    return _float(jnp.where((bits & _ABS) < _MIN_NORMAL, bits & _SIGN, bits))


class Float32Arithmetic:
    """float32 operations as the kernels execute them (section 1).

    Operands are expected flushed (`flush_denormal`, done once when a value is
    loaded); each result is flushed. Products also go through an XOR with
    `guard`, a uint32 zero computed at run time (None: no XOR), so that no
    compiler can contract a product and the add that uses it into an FMA.
    """

    def __init__(self, guard=None):
        self.guard = guard

    def mul(self, a, b):
        bits = _bits(a * b)
        bits = jnp.where((bits & _ABS) < _MIN_NORMAL, bits & _SIGN, bits)
        if self.guard is not None:
            bits = bits ^ self.guard
        return _float(bits)

    def add(self, a, b):
        return flush_denormal(a + b)

    def sub(self, a, b):
        return flush_denormal(a - b)

    def div(self, a, b):
        return flush_denormal(a / b)

    def sqrt(self, a):
        return jnp.sqrt(a)   # of a flushed operand: never subnormal


def runtime_zero(*scalars):
    """A uint32 zero that exists only at run time: `scalar < 0` of the first
    traced (array) scalar among `scalars`, all of which are valid only when
    non-negative. None if none is an array (then only the flush fences products)."""
    for scalar in scalars:
        if isinstance(scalar, jax.Array):
            return (jnp.asarray(scalar, jnp.float32) < 0).astype(jnp.uint32)
    return None


def kahan_add(weight, delta, compensation):
    """The paper's Kahan step in bfloat16 arithmetic (section 4).

    float32 arguments, as `tf_bf16.reference.kahan_add` (weight and compensation
    bf16-valued). Returns (new weight, new compensation), both bfloat16."""
    f = Float32Arithmetic()
    weight = flush_denormal(weight)
    update = _round_nearest_f32(delta)   # bits: a subnormal delta may round up to a normal
    y = _round_nearest_f32(f.sub(update, flush_denormal(compensation)))
    s = _round_nearest_f32(f.add(weight, y))
    s_minus_w = _round_nearest_f32(f.sub(s, weight))
    return round_nearest(s), round_nearest(f.sub(s_minus_w, y))


# ---------------------------------------------------------------------------
# Argument checks: static ones (dtype, shape, rounding) and the values of
# concrete scalars. Traced values cannot be checked inside `jit`.


def _describe(name, role):
    return f"'{role}'" + (f" (variable '{name}')" if name else "")


def _array(value, role, name):
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{_describe(name, role)} must be an array, got {value!r}.")
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{_describe(name, role)} must be an array: {e}") from None


def _check_integer(value, role):
    """seed, step, var_id: a Python/NumPy integer of int64's range or an integer
    scalar array, checked before anything is computed (the stream key takes the
    value as it is)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"'{role}' must be an integer, got a bool.")
    if isinstance(value, (int, np.integer)):
        if not -(1 << 63) <= int(value) < (1 << 63):
            raise ValueError(f"'{role}' = {int(value)} does not fit a signed 64-bit integer.")
        return
    array = _array(value, role, None)
    if array.ndim != 0:
        raise ValueError(f"'{role}' must be a scalar, got shape {array.shape}.")
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise TypeError(f"'{role}' must be an integer, got dtype {array.dtype}.")


def _check_stream(seed, step, var_id):
    for role, value in (("seed", seed), ("step", step), ("var_id", var_id)):
        _check_integer(value, role)


def _check_variable(value, role, name, like=None, dtype=None):
    array = _array(value, role, name)
    if like is None:
        if array.dtype not in (jnp.bfloat16, jnp.float32):
            raise ValueError(
                f"{_describe(name, role)} has dtype {array.dtype}; tf_bf16 updates bfloat16 "
                "and float32 arrays. Create it as bfloat16 (pure-bf16 training) or float32 "
                "(exact updates).")
        return array
    dtype = like.dtype if dtype is None else dtype
    if array.dtype != dtype:
        raise ValueError(
            f"{_describe(name, role)} has dtype {array.dtype} but {np.dtype(dtype).name} was "
            "expected (optimizer slots have the variable's dtype; Kahan compensation buffers "
            "are bfloat16).")
    if array.shape != like.shape:
        raise ValueError(f"{_describe(name, role)} has shape {array.shape} but {like.shape} was "
                         "expected (the shape of the variable being updated).")
    return array


def _check_tensor(value, role, shape, name):
    array = _array(value, role, name)
    if array.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"{_describe(name, role)} has dtype {array.dtype}; pass float32 or "
                         "bfloat16 (cast it first).")
    if array.shape != shape:
        raise ValueError(f"{_describe(name, role)} has shape {array.shape} but {shape} was "
                         "expected (the shape of the variable).")
    return array


def _check_rounding(rounding, variable, compensation, name):
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")
    bf16 = variable.dtype == jnp.bfloat16
    if rounding == "kahan" and bf16 and compensation is None:
        raise ValueError(
            f"rounding='kahan' on a bfloat16 variable{f' ({name})' if name else ''} needs "
            "`compensation`: a bfloat16 array of the same shape, zeros initially, kept across "
            "steps.")
    if compensation is not None and (rounding != "kahan" or not bf16):
        raise ValueError(
            f"`compensation` given{f' for {name}' if name else ''} with rounding={rounding!r} "
            f"on a {variable.dtype} variable; it is only used by rounding='kahan' on bfloat16 "
            "variables.")
    if compensation is None:
        return None
    return _check_variable(compensation, "compensation", name, like=variable,
                           dtype=jnp.bfloat16)


def _concrete(value):
    """The float value of a concrete scalar, None for a traced one."""
    # Tracers are recognised before float() is tried: the error JAX raises for
    # a traced value walks the whole computation traced so far to say where the
    # value came from, which made tracing a train step quadratic in the number
    # of variables (193 s for an 8-block Transformer on a CPU, instead of 5).
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _scalar(value, role, low=None, high=None, high_open=False):
    """A float32 hyperparameter (flushed); a concrete value is checked first."""
    value = _array(value, role, None) if not isinstance(value, (int, float)) else value
    if hasattr(value, "shape") and tuple(value.shape) != ():
        raise ValueError(f"'{role}' must be a scalar, got shape {tuple(value.shape)}.")
    if hasattr(value, "dtype") and not (jnp.issubdtype(value.dtype, jnp.floating) or
                                        jnp.issubdtype(value.dtype, jnp.integer)):
        raise TypeError(f"'{role}' must be a number, got dtype {value.dtype}.")
    concrete = _concrete(value)
    if concrete is not None:
        number = float(np.float32(concrete))
        bad = not math.isfinite(number) or (low is not None and number < low) or (
            high is not None and (number >= high if high_open else number > high))
        if bad:
            bounds = "" if low is None else (
                f" in [{low}, {high}{')' if high_open else ']'}" if high is not None
                else f" >= {low}")
            raise ValueError(f"'{role}' is {concrete}; pass a finite number{bounds}.")
    return flush_denormal(jnp.asarray(value, jnp.float32))


def _check_adam_step(step):
    """Adam's step is the 0-based iteration count (the bias correction needs
    beta ** (step + 1)); a concrete step is checked, a traced one cannot be."""
    if isinstance(step, (bool, np.bool_)):
        raise TypeError("'step' must be an integer, got a bool.")
    if isinstance(step, (int, np.integer)):
        value = int(step)
    else:
        concrete = _concrete(step)
        if concrete is None:
            return
        value = int(concrete)
    if not 0 <= value < (1 << 63) - 1:
        raise ValueError(f"'step' is {value}; Adam's step is the 0-based iteration count, in "
                         f"[0, {(1 << 63) - 2}] (the bias correction needs beta ** (step + 1)).")


def _check_adam_step_size(alpha, learning_rate, beta_1_power, beta_2_power):
    """The kernels' checks of the bias-correction powers and the step size
    (bf16_training_op_helpers.h), for concrete values."""
    values = [_concrete(x) for x in (alpha, learning_rate, beta_1_power, beta_2_power)]
    if any(v is None for v in values):
        return
    alpha, lr, b1p, b2p = values
    if not 0.0 <= b1p < 1.0:
        raise ValueError(f"'beta1_power' = beta_1 ** (step + 1) is {b1p}; it must be in "
                         "[0, 1) (beta_1 in [0, 1), step >= 0).")
    if not 0.0 <= b2p <= 1.0:
        raise ValueError(f"'beta2_power' = beta_2 ** (step + 1) is {b2p}; it must be in "
                         "[0, 1] (beta_2 in [0, 1), step >= 0).")
    if not math.isfinite(alpha):
        raise ValueError(f"Adam's step size lr * sqrt(1 - beta2_power) / (1 - beta1_power) is "
                         f"{alpha} for 'learning_rate' = {lr}: not finite; lower the learning "
                         "rate.")


# ---------------------------------------------------------------------------
# Storing state and committing the weight (section 5)


def _store_state(value, dtype, rounding, stream, slot):
    """Slots: exact in float32; bf16 nearest under 'nearest', else stochastic."""
    if dtype == jnp.float32:
        return canonicalize_nan(value)
    if rounding == "nearest":
        return round_nearest(value)
    return round_stochastic(value, stream.draw(_slot_draw(rounding, slot)))


def _commit(weight, delta, dtype, rounding, compensation, stream, f):
    """(new weight, new compensation or None); `weight` flushed float32.

    `delta` as loaded or computed: Kahan rounds its bits first (no flush), the
    other commits add it (flushed)."""
    if rounding == "kahan" and dtype == jnp.bfloat16:
        return kahan_add(weight, delta, load(compensation))
    total = f.add(weight, flush_denormal(delta))
    if dtype == jnp.float32:
        return canonicalize_nan(total), None
    if rounding == "stochastic":
        return round_stochastic(total, stream.draw(0)), None
    return round_nearest(total), None


def _decayed(delta, weight, weight_decay, lr, f):
    """delta - (w * wd) * lr, skipped when wd == 0 (0 * Inf must not reach the weight)."""
    concrete = _concrete(weight_decay)
    if concrete == 0.0:
        return delta
    decayed = f.sub(delta, f.mul(f.mul(weight, weight_decay), lr))
    return decayed if concrete is not None else jnp.where(weight_decay != 0, decayed, delta)


def _finish(out, new_weight, new_compensation):
    out = {"variable": new_weight, **out}
    if new_compensation is not None:
        out["compensation"] = new_compensation
    return out


def _load(array):
    """(raw float32, flushed float32) of a bf16/float32 array."""
    raw = load(array)
    return raw, flush_denormal(raw)


# ---------------------------------------------------------------------------
# Public functions: same names and arguments as tf_bf16.ops, new values returned.


def stochastic_round(x, seed, step=0, var_id=0, name=None):
    """Stochastically rounds a float32 array to bfloat16 (`tf_bf16.ops.stochastic_round`).

    Draw d0 of the stream (seed, step, var_id); no arithmetic, no flushing.
    Not differentiable (wrap the input in `lax.stop_gradient`)."""
    _check_stream(seed, step, var_id)
    x = _array(x, "x", name)
    if x.dtype != jnp.float32:
        raise ValueError(f"stochastic_round: 'x' has dtype {x.dtype}; pass float32.")
    return round_stochastic(x, _Stream(seed, step, var_id, x.shape).draw(0))


def rounded_assign_add(variable, delta, rounding="stochastic", compensation=None, seed=0,
                       step=0, var_id=0, name=None):
    """``variable + delta`` rounded as `rounding` says (`tf_bf16.ops.rounded_assign_add`).

    Returns ``{"variable": ..., "compensation": ...}`` (the compensation only
    under "kahan" on bfloat16)."""
    var = _check_variable(variable, "variable", name)
    _check_stream(seed, step, var_id)
    comp = _check_rounding(rounding, var, compensation, name)
    delta = _check_tensor(delta, "delta", var.shape, name)
    _, w = _load(var)
    new_w, new_c = _commit(w, load(delta), var.dtype, rounding, comp,
                           _Stream(seed, step, var_id, var.shape), Float32Arithmetic())
    return _finish({}, new_w, new_c)


def apply_sgd(variable, gradient, learning_rate, momentum=0.0, accumulator=None,
              nesterov=False, weight_decay=0.0, rounding="stochastic", compensation=None,
              seed=0, step=0, var_id=0, name=None):
    """One SGD step (`tf_bf16.ops.apply_sgd`, Keras's formulation).

    ``accum = accum * momentum - g * lr``; ``w += accum`` (Nesterov:
    ``w += accum * momentum - g * lr``); without an accumulator ``w -= g * lr``;
    a non-zero ``weight_decay`` also subtracts ``w * weight_decay * lr``.
    Returns ``{"variable", "accumulator" (if given), "compensation" (Kahan)}``.
    """
    var = _check_variable(variable, "variable", name)
    _check_stream(seed, step, var_id)
    comp = _check_rounding(rounding, var, compensation, name)
    grad = _check_tensor(gradient, "gradient", var.shape, name)
    accum = None if accumulator is None else _check_variable(accumulator, "accumulator", name,
                                                             like=var)
    if nesterov and accum is None:
        raise ValueError("apply_sgd: nesterov=True needs an accumulator.")
    lr = _scalar(learning_rate, "learning_rate", low=0.0)
    mom = _scalar(momentum, "momentum")
    wd = _scalar(weight_decay, "weight_decay")
    f = Float32Arithmetic(runtime_zero(learning_rate))
    stream = _Stream(seed, step, var_id, var.shape)
    _, w = _load(var)
    _, g = _load(grad)
    out = {}
    if accum is not None:
        a = f.sub(f.mul(_load(accum)[1], mom), f.mul(g, lr))
        out["accumulator"] = _store_state(a, var.dtype, rounding, stream, 0)
        update = f.sub(f.mul(a, mom), f.mul(g, lr)) if nesterov else a
    else:
        update = -f.mul(g, lr)
    delta = _decayed(update, w, wd, lr, f)
    return _finish(out, *_commit(w, delta, var.dtype, rounding, comp, stream, f))


def bias_correction_powers(beta_1, beta_2, step):
    """beta ** (step + 1) in float32, as `tf_bf16._args.bias_correction_powers` (tf.pow)."""
    if isinstance(step, (int, np.integer)) and not isinstance(step, (bool, np.bool_)):
        local_step = jnp.float32(int(step) + 1)
    else:
        step = jnp.asarray(step)
        if not jnp.issubdtype(step.dtype, jnp.integer):
            raise TypeError(f"'step' must be an integer, got dtype {step.dtype}.")
        local_step = (step + 1).astype(jnp.float32)
    return (jnp.power(jnp.asarray(beta_1, jnp.float32), local_step),
            jnp.power(jnp.asarray(beta_2, jnp.float32), local_step))


def _one_minus(beta, f):
    """``1 - beta`` in beta's own type, then float32, as Keras's Adam computes
    it (tf_bf16._args.one_minus): a Python float subtracts in float64 and rounds
    once (0.001 for 0.999), a float32 array subtracts in float32."""
    if isinstance(beta, (int, float, np.floating)) and not isinstance(beta, bool):
        return jnp.float32(1 - beta)
    return f.sub(jnp.float32(1), jnp.asarray(beta, jnp.float32))


def apply_adam(variable, gradient, m, v, learning_rate, beta_1=0.9, beta_2=0.999,
               epsilon=1e-7, step=0, vhat=None, weight_decay=0.0, rounding="stochastic",
               compensation=None, seed=0, var_id=0, name=None):
    """One Adam / AdamW / AMSGrad step (`tf_bf16.ops.apply_adam`).

    ``m += (g - m) * (1 - beta_1)``, ``v += (g**2 - v) * (1 - beta_2)``,
    ``w -= alpha * m / (sqrt(v) + epsilon)`` with
    ``alpha = lr * sqrt(1 - beta_2**(step+1)) / (1 - beta_1**(step+1))``, in
    float32; with ``vhat`` (AMSGrad) its running maximum replaces v.
    Returns ``{"variable", "m", "v", "vhat" (if given), "compensation" (Kahan)}``.
    """
    var = _check_variable(variable, "variable", name)
    _check_stream(seed, step, var_id)
    comp = _check_rounding(rounding, var, compensation, name)
    grad = _check_tensor(gradient, "gradient", var.shape, name)
    slots = {"m": _check_variable(m, "m", name, like=var),
             "v": _check_variable(v, "v", name, like=var)}
    if vhat is not None:
        slots["vhat"] = _check_variable(vhat, "vhat", name, like=var)
    lr = _scalar(learning_rate, "learning_rate", low=0.0)
    b1 = _scalar(beta_1, "beta_1", low=0.0, high=1.0, high_open=True)
    b2 = _scalar(beta_2, "beta_2", low=0.0, high=1.0, high_open=True)
    eps = _scalar(epsilon, "epsilon", low=0.0)
    wd = _scalar(weight_decay, "weight_decay")
    _check_adam_step(step)
    f = Float32Arithmetic(runtime_zero(learning_rate))
    b1p, b2p = bias_correction_powers(beta_1, beta_2, step)
    one = jnp.float32(1)
    # Per call, as scalars: fenced so that XLA computes them once, not per element.
    alpha, omb1, omb2 = lax.optimization_barrier((
        f.div(f.mul(lr, f.sqrt(f.sub(one, flush_denormal(b2p)))),
              f.sub(one, flush_denormal(b1p))),
        _one_minus(beta_1, f), _one_minus(beta_2, f)))
    _check_adam_step_size(alpha, lr, b1p, b2p)
    stream = _Stream(seed, step, var_id, var.shape)
    _, w = _load(var)
    _, g = _load(grad)
    _, m_old = _load(slots["m"])
    _, v_old = _load(slots["v"])
    m_new = f.add(m_old, f.mul(f.sub(g, m_old), omb1))
    v_new = f.add(v_old, f.mul(f.sub(f.mul(g, g), v_old), omb2))
    out = {"m": _store_state(m_new, var.dtype, rounding, stream, 0),
           "v": _store_state(v_new, var.dtype, rounding, stream, 1)}
    v_used = v_new
    if vhat is not None:
        vhat_raw, vhat_old = _load(slots["vhat"])
        # The comparison sees the flushed value; the select keeps the stored bits.
        v_used = jnp.where(jnp.isnan(v_new) | (v_new > vhat_old), v_new, vhat_raw)
        out["vhat"] = _store_state(v_used, var.dtype, rounding, stream, 2)
    step_size = f.div(f.mul(m_new, alpha), f.add(f.sqrt(flush_denormal(v_used)), eps))
    delta = _decayed(-step_size, w, wd, lr, f)
    return _finish(out, *_commit(w, delta, var.dtype, rounding, comp, stream, f))


def apply_lion(variable, gradient, m, learning_rate, beta_1=0.9, beta_2=0.99,
               weight_decay=0.0, rounding="stochastic", compensation=None, seed=0, step=0,
               var_id=0, name=None):
    """One Lion step (`tf_bf16.ops.apply_lion`, Keras's formulation).

    ``w -= lr * sign(m * beta_1 + g * (1 - beta_1))`` (sign(NaN) = NaN,
    sign(±0) = +0), ``m = m * beta_2 + g * (1 - beta_2)``, decoupled weight
    decay. Returns ``{"variable", "m", "compensation" (Kahan)}``.
    """
    var = _check_variable(variable, "variable", name)
    _check_stream(seed, step, var_id)
    comp = _check_rounding(rounding, var, compensation, name)
    grad = _check_tensor(gradient, "gradient", var.shape, name)
    m = _check_variable(m, "m", name, like=var)
    lr = _scalar(learning_rate, "learning_rate", low=0.0)
    b1 = _scalar(beta_1, "beta_1", low=0.0, high=1.0)
    b2 = _scalar(beta_2, "beta_2", low=0.0, high=1.0)
    wd = _scalar(weight_decay, "weight_decay")
    f = Float32Arithmetic(runtime_zero(learning_rate))
    one = jnp.float32(1)
    omb1, omb2 = f.sub(one, b1), f.sub(one, b2)
    stream = _Stream(seed, step, var_id, var.shape)
    _, w = _load(var)
    _, g = _load(grad)
    _, m_old = _load(m)
    c = f.add(f.mul(m_old, b1), f.mul(g, omb1))
    m_new = f.add(f.mul(m_old, b2), f.mul(g, omb2))
    sign = jnp.where(c > 0, one, jnp.where(c < 0, -one, jnp.where(jnp.isnan(c), c, 0 * one)))
    delta = _decayed(-f.mul(lr, sign), w, wd, lr, f)
    out = {"m": _store_state(m_new, var.dtype, rounding, stream, 0)}
    return _finish(out, *_commit(w, delta, var.dtype, rounding, comp, stream, f))


def moving_average(average, value, momentum, rounding="stochastic", seed=0, step=0,
                   var_id=0, name=None):
    """``average + ((momentum * average + (1 - momentum) * value) - average)``, rounded.

    Keras's EMA step as the Keras integration computes it on both backends
    (tf_bf16.optimizers.base): the new average in float32, committed to
    `average` with `rounded_assign_add` (float32 averages exactly, bf16 ones
    rounded as `rounding` says, which is never "kahan" here). `momentum` is the
    float32 scalar Keras uses (0 on the first step). Returns
    ``{"variable": new average}``."""
    avg = _check_variable(average, "average", name)
    val = _check_tensor(value, "value", avg.shape, name)
    f = Float32Arithmetic(runtime_zero(momentum))
    momentum = _scalar(momentum, "momentum")
    _, old = _load(avg)
    _, new_value = _load(val)
    new = f.add(f.mul(momentum, old), f.mul(f.sub(jnp.float32(1), momentum), new_value))
    return rounded_assign_add(avg, f.sub(new, old), rounding=rounding, seed=seed, step=step,
                              var_id=var_id, name=name)
