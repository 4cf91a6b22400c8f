"""Pure-TensorFlow reference of every tf_bf16 op, bit-identical to the kernels.

Composite TensorFlow ops only (no custom op), written straight from
docs/rounding.md: the tests compare the C++ kernels against it bit for bit,
and it documents the arithmetic in executable form. Same signatures as
``tf_bf16.ops``. It materializes several variable-sized temporaries, so it is
slow; it exists to be obviously right, not fast. Run it eagerly: graph
optimizations may reassociate float arithmetic.
"""

import tensorflow as tf

from tf_bf16 import _args
from tf_bf16._spec import CANONICAL_NAN_BF16
from tf_bf16._spec import CANONICAL_NAN_FLOAT32
from tf_bf16._spec import SECOND_HASH_CONSTANT
from tf_bf16._spec import STREAM_KEY_FINAL_WORD
from tf_bf16._spec import STREAM_KEY_INIT

_U32 = tf.uint32


def _u32(value):
    return tf.constant(value, _U32)


def mix32(x):
    """lowbias32: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))
    x = x * _u32(0x7FEB352D)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(15)))
    x = x * _u32(0x846CA68B)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))


def _split64(value):
    """(low, high) 32-bit halves of an int64 scalar, as uint32."""
    value = tf.bitcast(tf.cast(value, tf.int64), tf.uint64)
    low = tf.cast(tf.bitwise.bitwise_and(value, tf.constant(0xFFFFFFFF, tf.uint64)), _U32)
    high = tf.cast(tf.bitwise.right_shift(value, tf.constant(32, tf.uint64)), _U32)
    return low, high


def stream_key(seed, step, var_id):
    """The key of one op call's random stream: Mix32 absorbs seed, step, var_id
    (int64 scalars, low half first), then the final word 0."""
    key = _u32(STREAM_KEY_INIT)
    for word in (seed, step, var_id):
        low, high = _split64(word)
        key = mix32(tf.bitwise.bitwise_xor(key, low))
        key = mix32(tf.bitwise.bitwise_xor(key, high))
    return mix32(tf.bitwise.bitwise_xor(key, _u32(STREAM_KEY_FINAL_WORD)))


def element_hashes(key, flat_index):
    """(h0, h1) of each int64 element index, from a stream key:
    h0 = Mix32(Mix32(low32(i) ^ Mix32(key ^ high32(i)))), h1 = Mix32(h0 ^ C)."""
    low, high = _split64(flat_index)
    block_key = mix32(tf.bitwise.bitwise_xor(key, high))
    h0 = mix32(mix32(tf.bitwise.bitwise_xor(low, block_key)))
    return h0, mix32(tf.bitwise.bitwise_xor(h0, _u32(SECOND_HASH_CONSTANT)))


def draws(key, flat_index):
    """The four 16-bit draws [d0, d1, d2, d3] of each element (uint32 < 2**16):
    the high and low halves of h0, then of h1."""
    result = []
    for h in element_hashes(key, flat_index):
        result += [tf.bitwise.right_shift(h, _u32(16)), tf.bitwise.bitwise_and(h, _u32(0xFFFF))]
    return result


def _bits(x):
    return tf.bitcast(tf.cast(x, tf.float32), _U32)


def _to_bf16(bits32):
    """The bfloat16 whose bit pattern is the low 16 bits of bits32 (< 2**16)."""
    return tf.bitcast(tf.cast(bits32, tf.uint16), tf.bfloat16)


def _nan_or(bits, rounded):
    is_nan = tf.bitwise.bitwise_and(bits, _u32(0x7FFFFFFF)) > _u32(0x7F800000)
    return _to_bf16(tf.where(is_nan, _u32(CANONICAL_NAN_BF16), rounded))


def canonicalize_nan(x):
    """float32: every NaN becomes the canonical quiet NaN 0x7FC00000."""
    return tf.where(tf.math.is_nan(x), tf.bitcast(_u32(CANONICAL_NAN_FLOAT32), tf.float32), x)


def round_nearest(x):
    """float32 -> bfloat16, round to nearest, ties to even; NaN -> canonical NaN."""
    bits = _bits(x)
    lsb = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, _u32(16)), _u32(1))
    return _nan_or(bits, tf.bitwise.right_shift(bits + _u32(0x7FFF) + lsb, _u32(16)))


def round_stochastic(x, random16):
    """float32 -> bfloat16: add 16 random bits below the kept bits, truncate."""
    bits = _bits(x)
    return _nan_or(bits, tf.bitwise.right_shift(bits + random16, _u32(16)))


def _f32(x):
    return tf.cast(x, tf.float32)


def _rne_f32(x):
    return _f32(round_nearest(x))


def kahan_add(weight, delta, compensation):
    """The paper's Kahan step in bfloat16 arithmetic: returns (weight, compensation)."""
    update = _rne_f32(delta)
    y = _rne_f32(update - compensation)
    s = _rne_f32(weight + y)
    s_minus_w = _rne_f32(s - weight)
    return round_nearest(s), round_nearest(s_minus_w - y)


class _Stream:
    """Random bits of one op call: the stream key, element indices given."""

    def __init__(self, seed, step, var_id, flat_index):
        self.key = stream_key(_args.int64_scalar(seed, "seed"), _args.int64_scalar(step, "step"),
                              _args.int64_scalar(var_id, "var_id"))
        self.flat_index = flat_index
        self._draws = None

    def draw(self, k):
        """Draw k (0..3) of every element."""
        if self._draws is None:
            self._draws = draws(self.key, self.flat_index)
        return self._draws[k]


def slot_draw(rounding, slot):
    """The draw of optimizer slot `slot` (0: accum or m, 1: v, 2: vhat): the
    weight takes d0 under 'stochastic', the slots the draws after it."""
    return (1 if rounding == "stochastic" else 0) + slot


def _store_state(value, dtype, rounding, stream, slot):
    """Optimizer slots: exact in float32; bf16 nearest under 'nearest', else stochastic."""
    if dtype == tf.float32:
        return canonicalize_nan(value)
    if rounding == "nearest":
        return round_nearest(value)
    return round_stochastic(value, stream.draw(slot_draw(rounding, slot)))


def _commit_weight(weight, delta, dtype, rounding, compensation, stream):
    """Returns (new weight, new compensation or None)."""
    if dtype == tf.float32:
        return canonicalize_nan(weight + delta), None
    if rounding == "kahan":
        return kahan_add(weight, delta, compensation)
    if rounding == "stochastic":
        return round_stochastic(weight + delta, stream.draw(0)), None
    return round_nearest(weight + delta), None


# ---------------------------------------------------------------------------
# Per-element math on flat float32 vectors, in the kernels' operation order.

def _sgd_math(w, accum, g, lr, momentum, weight_decay, nesterov):
    new_accum = None
    if accum is not None:   # Keras's formulation: the accumulator holds -lr * velocity
        new_accum = accum * momentum - g * lr
        update = new_accum * momentum - g * lr if nesterov else new_accum
    else:
        update = -(g * lr)
    return _decayed(update, w, weight_decay, lr), new_accum


def _decayed(delta, w, weight_decay, lr):
    # Skipped when zero, as in the kernels: 0 * Inf must not reach the weight.
    return tf.cond(tf.not_equal(weight_decay, 0.0),
                   lambda: delta - (w * weight_decay) * lr, lambda: delta)


def _adam_math(w, m, v, vhat, g, p):
    m_new = m + (g - m) * p["one_minus_beta1"]
    v_new = v + (g * g - v) * p["one_minus_beta2"]
    v_used, vhat_new = v_new, None
    if vhat is not None:
        vhat_new = tf.where(tf.math.is_nan(v_new) | (v_new > vhat), v_new, vhat)
        v_used = vhat_new
    delta = -((m_new * p["alpha"]) / (tf.sqrt(v_used) + p["epsilon"]))
    return _decayed(delta, w, p["weight_decay"], p["lr"]), m_new, v_new, vhat_new


def _lion_math(w, m, g, p):
    c = m * p["beta1"] + g * p["one_minus_beta1"]
    m_new = m * p["beta2"] + g * p["one_minus_beta2"]
    sign = tf.where(tf.math.is_nan(c), c, tf.sign(c))  # NaN reaches the weight
    delta = -(p["lr"] * sign)
    return _decayed(delta, w, p["weight_decay"], p["lr"]), m_new


def _adam_scalars(learning_rate, beta_1, beta_2, epsilon, weight_decay, step):
    beta_1_power, beta_2_power = _args.bias_correction_powers(beta_1, beta_2, step)
    lr = _args.float_scalar(learning_rate, "learning_rate")
    return {
        "lr": lr,
        "alpha": lr * tf.sqrt(1.0 - beta_2_power) / (1.0 - beta_1_power),
        "one_minus_beta1": _args.one_minus(beta_1, "beta_1"),
        "one_minus_beta2": _args.one_minus(beta_2, "beta_2"),
        "epsilon": _args.float_scalar(epsilon, "epsilon"),
        "weight_decay": _args.float_scalar(weight_decay, "weight_decay"),
    }


# ---------------------------------------------------------------------------
# Dense and sparse drivers: gather flat float32 views, do the math, write back.

def _flat(variable):
    return tf.reshape(_f32(variable.read_value() if hasattr(variable, "read_value")
                           else variable.value), [-1])


def _assign(variable, flat_values):
    variable.assign(tf.reshape(tf.cast(flat_values, variable.dtype), variable.shape))


def _sparse_rounds(indices, num_rows):
    """Splits positions into rounds without repeated indices, in order.

    The k-th occurrence of an index goes to round k, so applying the rounds one
    after another equals applying the positions sequentially.
    """
    indices = tf.cast(indices, tf.int64)
    tf.debugging.assert_less(indices, tf.cast(num_rows, tf.int64),
                             message="sparse index out of range")
    tf.debugging.assert_non_negative(indices, message="sparse index out of range")
    order = tf.argsort(indices, stable=True)
    sorted_idx = tf.gather(indices, order)
    n = tf.shape(indices, out_type=tf.int64)[0]
    positions = tf.range(n, dtype=tf.int64)
    is_start = tf.concat([[True], sorted_idx[1:] != sorted_idx[:-1]], 0) if n > 0 else \
        tf.zeros([0], tf.bool)
    group_start = tf.scan(tf.maximum, tf.where(is_start, positions, 0),
                          initializer=tf.constant(0, tf.int64)) if n > 0 else positions
    occurrence = tf.scatter_nd(order[:, None], positions - group_start, [n])
    rounds = int(tf.reduce_max(occurrence).numpy()) + 1 if n > 0 else 0
    return indices, [tf.where(occurrence == r)[:, 0] for r in range(rounds)]


def _row_elements(rows, row_size):
    """Flat element indices of the given rows: [len(rows) * row_size]."""
    return tf.reshape(rows[:, None] * row_size + tf.range(row_size, dtype=tf.int64)[None, :],
                      [-1])


def _run_update(variables, gradient, math_fn, rounding, compensation, seed, step, var_id):
    """Applies math_fn to dense or sparse gradients.

    variables: dict role -> variable ("var" first, then slots in input order);
    math_fn(values: dict role -> flat f32, g: flat f32, stream) returns
    (delta, dict role -> new flat f32 slot values).
    """
    var = variables["var"]
    dtype = tf.as_dtype(var.dtype)
    shape = tf.TensorShape(var.shape)
    if isinstance(gradient, tf.IndexedSlices):
        row_size = shape[1:].num_elements()
        indices, rounds = _sparse_rounds(gradient.indices, shape[0])
        values = tf.reshape(_f32(gradient.values), [-1, row_size])
        for positions in rounds:
            rows = tf.gather(indices, positions)
            elements = _row_elements(rows, row_size)
            g = tf.reshape(tf.gather(values, positions), [-1])
            _update_elements(variables, elements, g, math_fn, dtype, rounding, compensation,
                             seed, step, var_id, sparse=True)
        return None
    n = shape.num_elements()
    g = tf.reshape(_f32(gradient), [-1])
    elements = tf.range(n, dtype=tf.int64)
    _update_elements(variables, elements, g, math_fn, dtype, rounding, compensation, seed,
                     step, var_id, sparse=False)
    return None


# The optimizer slots in input order (docs/rounding.md 3.3: the order of their draws).
_SLOTS = {"accum": 0, "m": 0, "v": 1, "vhat": 2}


def _update_elements(variables, elements, g, math_fn, dtype, rounding, compensation, seed,
                     step, var_id, sparse):
    stream = _Stream(seed, step, var_id, elements)

    def read(variable):
        flat = _flat(variable)
        return tf.gather(flat, elements) if sparse else flat

    def write(variable, new_values):
        if sparse:
            flat = tf.tensor_scatter_nd_update(
                tf.reshape(variable.read_value(), [-1]), elements[:, None],
                tf.cast(new_values, variable.dtype))
            variable.assign(tf.reshape(flat, variable.shape))
        else:
            _assign(variable, new_values)

    current = {role: read(v) for role, v in variables.items()}
    delta, new_slots = math_fn(current, g)
    comp = read(compensation) if compensation is not None else None
    new_w, new_comp = _commit_weight(current["var"], delta, dtype, rounding, comp, stream)
    for role, value in new_slots.items():
        write(variables[role], _store_state(value, dtype, rounding, stream, _SLOTS[role]))
    write(variables["var"], new_w)
    if new_comp is not None:
        write(compensation, new_comp)


# ---------------------------------------------------------------------------
# Public functions, same signatures as tf_bf16.ops.

def stochastic_round(x, seed, step=0, var_id=0, name=None):
    """Reference of ``tf_bf16.ops.stochastic_round``."""
    del name
    x = tf.convert_to_tensor(x)
    if x.dtype != tf.float32:
        raise _args.invalid(f"stochastic_round: 'x' has dtype {x.dtype.name}; pass float32.")
    flat = tf.reshape(x, [-1])
    stream = _Stream(seed, step, var_id, tf.range(tf.size(flat, out_type=tf.int64)))
    return tf.reshape(round_stochastic(flat, stream.draw(0)), tf.shape(x))


def rounded_assign_add(variable, delta, rounding="stochastic", compensation=None, seed=0,
                       step=0, var_id=0, name=None):
    """Reference of ``tf_bf16.ops.rounded_assign_add``."""
    del name
    dtype = _args.check_variable(variable, "variable")
    _args.check_rounding(rounding, dtype, compensation, _args.variable_name(variable))
    delta = _args.check_tensor(delta, "delta", tf.TensorShape(variable.shape))
    _args.check_distinct(variable=variable, compensation=compensation)
    _run_update({"var": variable}, delta, lambda cur, g: (g, {}), rounding, compensation,
                seed, step, var_id)


def apply_sgd(variable, gradient, learning_rate, momentum=0.0, accumulator=None,
              nesterov=False, weight_decay=0.0, rounding="stochastic", compensation=None,
              seed=0, step=0, var_id=0, name=None):
    """Reference of ``tf_bf16.ops.apply_sgd``."""
    del name
    dtype = _args.check_variable(variable, "variable")
    _args.check_rounding(rounding, dtype, compensation, _args.variable_name(variable))
    lr = _args.float_scalar(learning_rate, "learning_rate")
    mom = _args.float_scalar(momentum, "momentum")
    wd = _args.float_scalar(weight_decay, "weight_decay")
    _args.check_distinct(variable=variable, accumulator=accumulator, compensation=compensation)
    variables = {"var": variable}
    if accumulator is not None:
        variables["accum"] = accumulator

    def math_fn(cur, g):
        delta, new_accum = _sgd_math(cur["var"], cur.get("accum"), g, lr, mom, wd, nesterov)
        return delta, ({} if new_accum is None else {"accum": new_accum})

    _run_update(variables, gradient, math_fn, rounding, compensation, seed, step, var_id)


def apply_adam(variable, gradient, m, v, learning_rate, beta_1=0.9, beta_2=0.999,
               epsilon=1e-7, step=0, vhat=None, weight_decay=0.0, rounding="stochastic",
               compensation=None, seed=0, var_id=0, name=None):
    """Reference of ``tf_bf16.ops.apply_adam``."""
    del name
    dtype = _args.check_variable(variable, "variable")
    _args.check_rounding(rounding, dtype, compensation, _args.variable_name(variable))
    _args.check_distinct(variable=variable, m=m, v=v, vhat=vhat, compensation=compensation)
    _args.check_adam_step(step)
    p = _adam_scalars(learning_rate, beta_1, beta_2, epsilon, weight_decay, step)
    variables = {"var": variable, "m": m, "v": v}
    if vhat is not None:
        variables["vhat"] = vhat

    def math_fn(cur, g):
        delta, m_new, v_new, vhat_new = _adam_math(cur["var"], cur["m"], cur["v"],
                                                   cur.get("vhat"), g, p)
        slots = {"m": m_new, "v": v_new}
        if vhat_new is not None:
            slots["vhat"] = vhat_new
        return delta, slots

    _run_update(variables, gradient, math_fn, rounding, compensation, seed, step, var_id)


def apply_lion(variable, gradient, m, learning_rate, beta_1=0.9, beta_2=0.99,
               weight_decay=0.0, rounding="stochastic", compensation=None, seed=0, step=0,
               var_id=0, name=None):
    """Reference of ``tf_bf16.ops.apply_lion``."""
    del name
    dtype = _args.check_variable(variable, "variable")
    _args.check_rounding(rounding, dtype, compensation, _args.variable_name(variable))
    _args.check_distinct(variable=variable, m=m, compensation=compensation)
    beta1 = _args.float_scalar(beta_1, "beta_1")
    beta2 = _args.float_scalar(beta_2, "beta_2")
    p = {"lr": _args.float_scalar(learning_rate, "learning_rate"), "beta1": beta1,
         "one_minus_beta1": 1.0 - beta1, "beta2": beta2, "one_minus_beta2": 1.0 - beta2,
         "weight_decay": _args.float_scalar(weight_decay, "weight_decay")}

    def math_fn(cur, g):
        delta, m_new = _lion_math(cur["var"], cur["m"], g, p)
        return delta, {"m": m_new}

    _run_update({"var": variable, "m": m}, gradient, math_fn, rounding, compensation, seed,
                step, var_id)
