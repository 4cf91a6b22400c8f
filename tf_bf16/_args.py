"""Argument checks shared by the op wrappers (tf_bf16.ops) and the reference,
and the one list of rounding modes (`ROUNDINGS`, also `tf_bf16.ROUNDINGS`, defined
in tf_bf16/_spec.py) that the ops, the optimizers and the tests use.

Checks that can be made from static information (dtypes, ranks, known shapes,
rounding names) raise here, at call or trace time, naming the variable; the
kernels repeat every check at run time and add the value checks (NaN learning
rate, index range), always before writing anything.
"""

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


def variable_dtype(variable):
    return tf.as_dtype(variable.dtype)


def check_variable(variable, role, expected_dtype=None, expected_shape=None):
    """Returns the variable's dtype after checking dtype and (static) shape."""
    dtype = variable_dtype(variable)
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
    value = tf.convert_to_tensor(value)
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
    value = tf.convert_to_tensor(value)
    if value.shape.rank not in (None, 0):
        raise invalid(f"'{role}' must be a scalar, got shape {value.shape}.")
    if not (value.dtype.is_floating or value.dtype.is_integer):
        raise invalid(f"'{role}' must be a number, got dtype {value.dtype.name}.")
    return tf.cast(value, tf.float32)


def int64_scalar(value, role):
    value = tf.convert_to_tensor(value)
    if value.shape.rank not in (None, 0):
        raise invalid(f"'{role}' must be a scalar, got shape {value.shape}.")
    if not value.dtype.is_integer:
        raise invalid(f"'{role}' must be an integer, got dtype {value.dtype.name}.")
    return tf.cast(value, tf.int64)


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
