"""Argument checks shared by the op wrappers (tf_bf16.ops) and the reference,
and the one list of rounding modes (`ROUNDINGS`, also `tf_bf16.ROUNDINGS`, defined
in tf_bf16/_spec.py) that the ops, the optimizers and the tests use.

Checks that can be made from static information (dtypes, ranks, known shapes,
rounding names) raise here, at call or trace time, naming the variable; the
kernels repeat every check at run time and add the value checks (NaN learning
rate, index range), always before writing anything.
"""

import numpy as np
import tensorflow as tf

from tf_bf16._spec import ROUNDINGS  # noqa: F401  (re-exported: the ops' one list)

UPDATABLE_DTYPES = (tf.float32, tf.bfloat16)


def invalid(message):
    return tf.errors.InvalidArgumentError(None, None, message)


def variable_name(variable):
    """The Keras path of a variable (e.g. 'dense/kernel'), else its TF name."""
    for attr in ("path", "name"):
        name = getattr(variable, attr, None)
        if isinstance(name, str) and name:
            return name
    return "<unnamed>"


def resource_handle(variable, role):
    """The resource handle of a tf.Variable or Keras Variable."""
    if isinstance(variable, tf.Tensor) and variable.dtype == tf.resource:
        return variable
    handle = getattr(variable, "handle", None)
    if handle is None:
        value = getattr(variable, "value", None)
        handle = getattr(value, "handle", None)
    if handle is None:
        raise TypeError(
            f"'{role}' must be a tf.Variable or keras.Variable (resource variable), got "
            f"{type(variable).__name__}. tf_bf16 updates variables in place.")
    return handle


def variable_dtype(variable, role="variable"):
    try:
        return tf.as_dtype(variable.dtype)
    except (AttributeError, TypeError):
        raise TypeError(
            f"'{role}' must be a tf.Variable or keras.Variable (resource variable), got "
            f"{type(variable).__name__}. tf_bf16 updates variables in place.") from None


def to_tensor(value, role):
    """tf.convert_to_tensor, its conversion errors naming the argument."""
    if value is None or isinstance(value, (str, bytes)):
        raise invalid(f"'{role}' must be a number or tensor, got {value!r}.")
    try:
        return tf.convert_to_tensor(value)
    except (TypeError, ValueError) as error:
        raise invalid(f"'{role}' cannot be converted to a tensor ({value!r}): {error}") \
            from None


def check_variable(variable, role, expected_dtype=None, expected_shape=None):
    """Returns the variable's dtype after checking dtype and (static) shape."""
    dtype = variable_dtype(variable, role)
    name = variable_name(variable)
    if expected_dtype is None:
        if dtype not in UPDATABLE_DTYPES:
            raise invalid(
                f"'{role}' (variable '{name}') has dtype {dtype.name}; tf_bf16 updates "
                "bfloat16 and float32 variables. Create it as bfloat16 (pure-bf16 "
                "training) or float32 (exact updates). Nothing was updated.")
    elif dtype != expected_dtype:
        raise invalid(
            f"'{role}' (variable '{name}') has dtype {dtype.name} but {expected_dtype.name} "
            "was expected (optimizer slots have the variable's dtype; Kahan compensation "
            "buffers are bfloat16). Nothing was updated.")
    if expected_shape is not None:
        shape = tf.TensorShape(variable.shape)
        if not shape.is_compatible_with(expected_shape):
            raise invalid(
                f"'{role}' (variable '{name}') has shape {shape} but {expected_shape} was "
                "expected (the shape of the variable being updated). Nothing was updated.")
    return dtype


def check_tensor(value, role, expected_shape=None):
    """Converts a gradient or delta; float32 or bfloat16, other dtypes refused."""
    if isinstance(value, tf.IndexedSlices):
        raise invalid(f"'{role}' is IndexedSlices here; pass a dense tensor.")
    value = to_tensor(value, role)
    if value.dtype not in UPDATABLE_DTYPES:
        raise invalid(
            f"'{role}' has dtype {value.dtype.name}; pass float32 or bfloat16 (cast it "
            "first). Nothing was updated.")
    if expected_shape is not None and not value.shape.is_compatible_with(expected_shape):
        raise invalid(f"'{role}' has shape {value.shape} but {expected_shape} was expected "
                      "(the shape of the variable). Nothing was updated.")
    return value


def check_rounding(rounding, dtype, compensation, name):
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")
    if rounding == "kahan" and dtype == tf.bfloat16 and compensation is None:
        raise invalid(
            f"rounding='kahan' on bfloat16 variable '{name}' needs `compensation`: a "
            "bfloat16 variable of the same shape, initialized to zeros, kept across "
            "steps. Nothing was updated.")
    if compensation is not None and (rounding != "kahan" or dtype != tf.bfloat16):
        raise invalid(
            f"`compensation` given for variable '{name}' ({dtype.name}) with "
            f"rounding={rounding!r}; it is only used by rounding='kahan' on bfloat16 "
            "variables. Nothing was updated.")


def float_scalar(value, role):
    value = to_tensor(value, role)
    if value.shape.rank not in (None, 0):
        raise invalid(f"'{role}' must be a scalar, got shape {value.shape}.")
    if not (value.dtype.is_floating or value.dtype.is_integer):
        raise invalid(f"'{role}' must be a number, got dtype {value.dtype.name}.")
    return tf.cast(value, tf.float32)


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def python_integer(value):
    """A Python or NumPy integer (not a bool) as a Python int, else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return None


def check_int64(value, role, low=INT64_MIN, high=INT64_MAX, why=""):
    """A Python/NumPy integer in [low, high], else an error naming `role`."""
    if isinstance(value, (bool, np.bool_)):
        raise invalid(f"'{role}' must be an integer, got the bool {value!r}.")
    number = python_integer(value)
    if number is None:
        raise invalid(f"'{role}' must be an integer, got {type(value).__name__} {value!r}.")
    if not low <= number <= high:
        raise invalid(f"'{role}' is {number}, outside [{low}, {high}]{why}. Nothing was "
                      "updated.")
    return number


def int64_scalar(value, role):
    """A seed, step or var_id as an int64 scalar tensor.

    Python and NumPy integers are range-checked first (a value outside int64
    would otherwise fail in the conversion without naming the argument, or,
    for np.uint64, wrap); tensors must have a signed integer dtype or one
    that fits (uint8/16/32)."""
    if python_integer(value) is not None or isinstance(value, (bool, np.bool_)):
        return tf.constant(check_int64(value, role), tf.int64)
    value = to_tensor(value, role)
    if value.shape.rank not in (None, 0):
        raise invalid(f"'{role}' must be a scalar, got shape {value.shape}.")
    if not value.dtype.is_integer:
        raise invalid(f"'{role}' must be an integer, got dtype {value.dtype.name}.")
    if value.dtype == tf.uint64:
        raise invalid(f"'{role}' has dtype uint64, which does not fit int64; pass int64.")
    return tf.cast(value, tf.int64)


def check_adam_step(step):
    """Adam's step is the 0-based iteration count: a Python/NumPy integer is checked
    here (step + 1 must not overflow); tensors are checked by the kernel (>= 0)."""
    if python_integer(step) is not None or isinstance(step, (bool, np.bool_)):
        check_int64(step, "step", 0, INT64_MAX - 1,
                    " (Adam's step is the 0-based iteration count; the bias correction "
                    "needs beta ** (step + 1))")


def check_distinct(**roles):
    """The variables of one update are different variables: the same one in two roles
    (compensation=variable, m=v, accumulator=variable, ...) is refused, naming both.

    Variables are compared by their resource handle (a Keras Variable by its
    tf.Variable's); the kernels compare the underlying variables again."""
    seen = {}
    for role, variable in roles.items():
        if variable is None:
            continue
        handle = resource_handle(variable, role)
        for other_role, other_handle in seen.items():
            if handle is other_handle:
                raise invalid(
                    f"'{other_role}' and '{role}' are the same variable "
                    f"('{variable_name(variable)}'): the weight, each optimizer slot and the "
                    "compensation buffer must be different variables. Nothing was updated.")
        seen[role] = handle


def _in_xla_context():
    """Whether ops are being traced for XLA (`tf.function(jit_compile=True)`)."""
    try:
        from tensorflow.python.ops import control_flow_util
        return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    except (ImportError, AttributeError):  # pragma: no cover - TensorFlow internals moved
        return False


def checked_indices(indices, rows):
    """Sparse gradient indices checked to lie in [0, rows) before a gradient is densified.

    Densifying (`UnsortedSegmentSum`) drops a negative index silently and
    refuses an index >= rows without naming it. Eagerly this raises
    InvalidArgumentError naming 'indices' and the first bad position; in a
    graph, an Assert that the densified gradient depends on raises it at run
    time, before any update. Under XLA an Assert compiles to nothing:
    `indices_valid` below is then what keeps the variables untouched.
    """
    indices = tf.convert_to_tensor(indices)
    if indices.dtype not in (tf.int32, tf.int64):
        raise invalid(f"Sparse gradient 'indices' have dtype {indices.dtype.name}; int32 or "
                      "int64 expected.")
    rows = tf.cast(rows, indices.dtype)
    bad = tf.logical_or(indices < 0, indices >= rows)
    if tf.executing_eagerly():
        positions = np.flatnonzero(np.reshape(bad.numpy(), [-1]))
        if positions.size:
            k = int(positions[0])
            raise invalid(f"Input 'indices'[{k}] = {int(tf.reshape(indices, [-1])[k])} is "
                          f"not in [0, {int(rows)}), the rows of the variable. Nothing was "
                          "updated.")
        return indices
    if _in_xla_context():
        return indices
    # The first bad position, for the message (a sentinel keeps an empty index
    # list valid: ArgMax of nothing fails).
    flat = tf.reshape(indices, [-1])
    first = tf.argmax(tf.concat([tf.cast(tf.reshape(bad, [-1]), tf.int32), [1]], 0),
                      output_type=tf.int64)
    # One string, without quotes (Assert prints string data escaped): "assertion
    # failed: [Input indices[2] = -1 is not in [0, 4), ...]".
    message = tf.strings.format(
        "Input indices[{}] = {} is not in [0, {}), the rows of the variable (a sparse "
        "gradient). Nothing was updated.",
        (first, tf.gather(tf.concat([flat, tf.zeros([1], flat.dtype)], 0), first), rows))
    assertion = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [message])
    with tf.control_dependencies([assertion]):
        return tf.identity(indices)


def indices_valid(indices, rows):
    """Scalar bool: every index in [0, rows)."""
    indices = tf.convert_to_tensor(indices)
    rows = tf.cast(rows, indices.dtype)
    return tf.reduce_all(tf.logical_and(indices >= 0, indices < rows))


def densified(gradient, rows, learning_rate=None):
    """(dense float32 gradient, learning rate) of an IndexedSlices gradient, indices checked
    against `rows` (the variable's first dimension; the gradient's dense_shape if None).

    Under XLA, where nothing can raise, an invalid index makes the learning
    rate NaN: the lowering's run-time check then skips the whole update and
    writes every variable back unchanged, as it does for a bad index of a
    sparse update (docs/rounding.md 8.4). Without a learning rate (gradient
    accumulators) XLA's densification drops the bad rows."""
    if rows is None:
        rows = gradient.dense_shape[0]
    indices = checked_indices(gradient.indices, rows)
    dense = tf.convert_to_tensor(tf.IndexedSlices(
        tf.cast(gradient.values, tf.float32), indices, gradient.dense_shape))
    if learning_rate is not None and _in_xla_context():
        learning_rate = tf.where(indices_valid(indices, rows),
                                 float_scalar(learning_rate, "learning_rate"),
                                 tf.constant(float("nan"), tf.float32))
    return dense, learning_rate


def one_minus(beta, role):
    """``1 - beta`` evaluated in beta's own type, then float32 (Keras's Adam).

    Keras writes ``(g - m) * (1 - self.beta_1)``: for a Python float the
    difference is computed in float64 and rounded once to float32 (0.001 for
    beta = 0.999), for a float32 tensor in float32 (``1 - float32(0.999)`` =
    0.00099998713). tf_bf16 passes the same float32 constant to its ops.
    """
    float_scalar(beta, role)  # refuses non-numbers and non-scalars, naming the argument
    return float_scalar(1 - beta, role)


def bias_correction_powers(beta_1, beta_2, step):
    """beta ** (step + 1) in float32, as Keras computes them."""
    local_step = tf.cast(int64_scalar(step, "step") + 1, tf.float32)
    return (tf.pow(float_scalar(beta_1, "beta_1"), local_step),
            tf.pow(float_scalar(beta_2, "beta_2"), local_step))
