"""Python API of the tf_bf16 ops: stochastic rounding and fused in-place updates.

Every update function takes the variable(s) to update in place, the gradient
or delta, the hyperparameters as scalars (Python numbers or tensors; tensors
never cause retracing), and the rounding:

- ``"nearest"``: round to nearest even, what plain bfloat16 training does;
- ``"stochastic"``: unbiased stochastic rounding, random bits from a
  counter-based hash of ``(seed, step, var_id, element index)``;
- ``"kahan"``: Kahan-compensated summation with a bfloat16 ``compensation``
  variable of the weight's shape.

float32 variables are updated exactly (the rounding only applies to bfloat16).
The rounding specification is docs/rounding.md; ``tf_bf16.reference`` is a
pure-TensorFlow implementation of the same functions, bit-identical.

Bad input (docs/rounding.md, section 7, "Allowed ranges") raises
``InvalidArgumentError`` naming the input, before anything is written: Python
and NumPy integers (seed, step, var_id) and the variables' roles are checked
here, every value again by the kernels (CPU and CUDA share the checks). Under
``tf.function(jit_compile=True)`` the XLA lowering refuses bad compile-time
constants and skips the update for bad run-time values (section 8.4).
"""

import tensorflow as tf

from tf_bf16 import _args
from tf_bf16 import _loader

__all__ = [
    "stochastic_round",
    "rounded_assign_add",
    "apply_sgd",
    "apply_adam",
    "apply_lion",
]


@tf.autograph.experimental.do_not_convert
def _lib():
    return _loader.load()


def stochastic_round(x, seed, step=0, var_id=0, name=None):
    """Stochastically rounds a float32 tensor to bfloat16.

    Args:
        x: float32 tensor (other float dtypes are refused: cast explicitly).
        seed: integer scalar.
        step: integer scalar; a different step gives independent bits.
        var_id: integer scalar naming the stream, e.g. one per variable.
        name: optional op name.

    Returns:
        bfloat16 tensor of x's shape; each element is one of the two bfloat16
        neighbours of x, rounded up with probability equal to its distance
        from the lower one, so that E[result] = x.
    """
    x = tf.convert_to_tensor(x)
    if x.dtype != tf.float32:
        raise _args.invalid(f"stochastic_round: 'x' has dtype {x.dtype.name}; pass float32.")
    return _lib().tf_bf16_stochastic_round(
        x=x, seed=_args.int64_scalar(seed, "seed"), step=_args.int64_scalar(step, "step"),
        var_id=_args.int64_scalar(var_id, "var_id"), name=name)


def rounded_assign_add(variable, delta, rounding="stochastic", compensation=None, seed=0,
                       step=0, var_id=0, name=None):
    """``variable += delta``, rounded to the variable's dtype as ``rounding`` says.

    Usable by any optimizer or running statistic whose increments are too
    small for round-to-nearest.

    Args:
        variable: bfloat16 or float32 variable, updated in place.
        delta: float32 or bfloat16 tensor of the variable's shape.
        rounding: ``"nearest"``, ``"stochastic"`` or ``"kahan"``.
        compensation: bfloat16 variable of the same shape, required by
            ``"kahan"`` on bfloat16 variables, zeros initially.
        seed, step, var_id: integer scalars keying the stochastic rounding.
        name: optional op name.

    Returns:
        The op (None when executing eagerly).
    """
    dtype = _args.check_variable(variable, "variable")
    name_ = _args.variable_name(variable)
    _args.check_rounding(rounding, dtype, compensation, name_)
    delta = _args.check_tensor(delta, "delta", tf.TensorShape(variable.shape))
    _args.check_distinct(variable=variable, compensation=compensation)
    return _lib().tf_bf16_resource_rounded_assign_add(
        var=_args.resource_handle(variable, "variable"),
        compensation=_compensation_list(compensation, variable),
        delta=delta, seed=_args.int64_scalar(seed, "seed"),
        step=_args.int64_scalar(step, "step"), var_id=_args.int64_scalar(var_id, "var_id"),
        T=dtype, rounding=rounding, name=name)


def apply_sgd(variable, gradient, learning_rate, momentum=0.0, accumulator=None,
              nesterov=False, weight_decay=0.0, rounding="stochastic", compensation=None,
              seed=0, step=0, var_id=0, name=None):
    """Fused SGD step (momentum, Nesterov, decoupled weight decay), in place.

    With an ``accumulator``: ``accum = accum * momentum - grad * lr`` and
    ``variable += accum`` (Nesterov:
    ``variable += accum * momentum - grad * lr``), Keras's formulation and
    that of ``tf.raw_ops.ResourceApplyKerasMomentum``: the accumulator holds
    the rate-scaled step, so under a learning-rate schedule it is Keras's
    momentum slot. Without one: ``variable -= grad * lr``. A non-zero
    ``weight_decay`` also subtracts ``variable * weight_decay * lr``. The math
    runs in float32 and each state tensor is rounded once.

    Args:
        variable: bfloat16 or float32 variable.
        gradient: dense tensor of the variable's shape, or ``tf.IndexedSlices``
            (sparse update of the given rows only; duplicate indices are
            applied in order, as TensorFlow's sparse apply ops do).
        learning_rate, momentum, weight_decay: float scalars.
        accumulator: momentum slot, same dtype and shape as the variable, or
            None for plain SGD.
        nesterov: use Nesterov momentum (needs an accumulator).
        rounding, compensation, seed, step, var_id: see ``rounded_assign_add``.
        name: optional op name.
    """
    dtype = _args.check_variable(variable, "variable")
    name_ = _args.variable_name(variable)
    _args.check_rounding(rounding, dtype, compensation, name_)
    accum = [] if accumulator is None else [accumulator]
    for slot in accum:
        _args.check_variable(slot, "accumulator", dtype, tf.TensorShape(variable.shape))
    if nesterov and accumulator is None:
        raise _args.invalid("apply_sgd: nesterov=True needs an accumulator.")
    _args.check_distinct(variable=variable, accumulator=accumulator, compensation=compensation)
    common = dict(
        var=_args.resource_handle(variable, "variable"),
        accum=[_args.resource_handle(a, "accumulator") for a in accum],
        compensation=_compensation_list(compensation, variable),
        lr=_args.float_scalar(learning_rate, "learning_rate"),
        momentum=_args.float_scalar(momentum, "momentum"),
        weight_decay=_args.float_scalar(weight_decay, "weight_decay"),
        seed=_args.int64_scalar(seed, "seed"), step=_args.int64_scalar(step, "step"),
        var_id=_args.int64_scalar(var_id, "var_id"), T=dtype, rounding=rounding,
        use_nesterov=bool(nesterov), name=name)
    if isinstance(gradient, tf.IndexedSlices):
        values, indices = _check_sparse(gradient, variable)
        return _lib().tf_bf16_resource_sparse_apply_sgd(grad=values, indices=indices, **common)
    grad = _args.check_tensor(gradient, "gradient", tf.TensorShape(variable.shape))
    return _lib().tf_bf16_resource_apply_sgd(grad=grad, **common)


def apply_adam(variable, gradient, m, v, learning_rate, beta_1=0.9, beta_2=0.999,
               epsilon=1e-7, step=0, vhat=None, weight_decay=0.0, rounding="stochastic",
               compensation=None, seed=0, var_id=0, name=None):
    """Fused Adam / AdamW / AMSGrad step, in place, one pass over memory.

    ``m += (g - m) * (1 - beta_1)``, ``v += (g**2 - v) * (1 - beta_2)``,
    ``variable -= alpha * m / (sqrt(v) + epsilon)`` with
    ``alpha = lr * sqrt(1 - beta_2**(step+1)) / (1 - beta_1**(step+1))``
    computed in float32 (so beta_2 = 0.999 is not rounded to 1 as it is in
    bfloat16), the formulation of ``tf.raw_ops.ResourceApplyAdam`` and Keras.
    ``1 - beta`` is evaluated as Keras's Adam evaluates it, in beta's own
    type (a Python float: in float64, then rounded to float32; a float32
    tensor: in float32, as ``ResourceApplyAdam``), and passed to the op.
    With ``vhat`` (AMSGrad) the running maximum of v is used instead of v.
    A non-zero ``weight_decay`` subtracts ``variable * weight_decay * lr``
    (AdamW's decoupled decay).

    Args:
        variable: bfloat16 or float32 variable.
        gradient: dense tensor or ``tf.IndexedSlices`` (lazy sparse update:
            only the given rows and their moments are touched).
        m, v: moment slots, same dtype and shape as the variable.
        learning_rate, beta_1, beta_2, epsilon, weight_decay: float scalars.
        step: the optimizer's 0-based iteration count; keys the bias
            correction and the stochastic rounding.
        vhat: AMSGrad slot or None.
        rounding, compensation, seed, var_id: see ``rounded_assign_add``.
        name: optional op name.
    """
    dtype = _args.check_variable(variable, "variable")
    name_ = _args.variable_name(variable)
    _args.check_rounding(rounding, dtype, compensation, name_)
    shape = tf.TensorShape(variable.shape)
    slots = {"m": m, "v": v}
    if vhat is not None:
        slots["vhat"] = vhat
    for role, slot in slots.items():
        _args.check_variable(slot, role, dtype, shape)
    _args.check_distinct(variable=variable, **slots, compensation=compensation)
    _args.check_adam_step(step)
    beta_1_power, beta_2_power = _args.bias_correction_powers(beta_1, beta_2, step)
    common = dict(
        var=_args.resource_handle(variable, "variable"),
        m=_args.resource_handle(m, "m"), v=_args.resource_handle(v, "v"),
        vhat=[] if vhat is None else [_args.resource_handle(vhat, "vhat")],
        compensation=_compensation_list(compensation, variable),
        beta1_power=beta_1_power, beta2_power=beta_2_power,
        lr=_args.float_scalar(learning_rate, "learning_rate"),
        one_minus_beta1=_args.one_minus(beta_1, "beta_1"),
        one_minus_beta2=_args.one_minus(beta_2, "beta_2"),
        epsilon=_args.float_scalar(epsilon, "epsilon"),
        weight_decay=_args.float_scalar(weight_decay, "weight_decay"),
        seed=_args.int64_scalar(seed, "seed"), step=_args.int64_scalar(step, "step"),
        var_id=_args.int64_scalar(var_id, "var_id"), T=dtype, rounding=rounding, name=name)
    if isinstance(gradient, tf.IndexedSlices):
        values, indices = _check_sparse(gradient, variable)
        return _lib().tf_bf16_resource_sparse_apply_adam(grad=values, indices=indices,
                                                         **common)
    grad = _args.check_tensor(gradient, "gradient", shape)
    return _lib().tf_bf16_resource_apply_adam(grad=grad, **common)


def apply_lion(variable, gradient, m, learning_rate, beta_1=0.9, beta_2=0.99,
               weight_decay=0.0, rounding="stochastic", compensation=None, seed=0, step=0,
               var_id=0, name=None):
    """Fused Lion step, in place, one pass over memory.

    ``variable -= lr * sign(m * beta_1 + g * (1 - beta_1))`` and
    ``m = m * beta_2 + g * (1 - beta_2)`` (Keras's formulation of Chen et al.
    2023), with decoupled weight decay ``variable -= variable * wd * lr``.
    Every Lion step moves each weight by exactly ``lr``, which round-to-nearest
    cancels for every weight larger than about ``256 * lr``: Lion needs SR or
    Kahan in bfloat16 more than most.

    Args:
        variable: bfloat16 or float32 variable.
        gradient: dense tensor of the variable's shape (``IndexedSlices`` are
            densified: Lion moves every row's momentum).
        m: momentum slot, same dtype and shape as the variable.
        learning_rate, beta_1, beta_2, weight_decay: float scalars.
        rounding, compensation, seed, step, var_id: see ``rounded_assign_add``.
        name: optional op name.
    """
    dtype = _args.check_variable(variable, "variable")
    _args.check_rounding(rounding, dtype, compensation, _args.variable_name(variable))
    shape = tf.TensorShape(variable.shape)
    _args.check_variable(m, "m", dtype, shape)
    _args.check_distinct(variable=variable, m=m, compensation=compensation)
    if isinstance(gradient, tf.IndexedSlices):
        if shape.rank == 0:
            raise _args.invalid(f"'gradient' is sparse (IndexedSlices) but 'variable' "
                                f"('{_args.variable_name(variable)}') is a scalar; pass a "
                                "dense gradient.")
        # Lion moves every row: densified, its indices checked first (docs/rounding.md 7).
        gradient, learning_rate = _args.densified(gradient, shape[0], learning_rate)
    grad = _args.check_tensor(gradient, "gradient", shape)
    return _lib().tf_bf16_resource_apply_lion(
        var=_args.resource_handle(variable, "variable"), m=_args.resource_handle(m, "m"),
        compensation=_compensation_list(compensation, variable),
        lr=_args.float_scalar(learning_rate, "learning_rate"),
        beta1=_args.float_scalar(beta_1, "beta_1"), beta2=_args.float_scalar(beta_2, "beta_2"),
        weight_decay=_args.float_scalar(weight_decay, "weight_decay"), grad=grad,
        seed=_args.int64_scalar(seed, "seed"), step=_args.int64_scalar(step, "step"),
        var_id=_args.int64_scalar(var_id, "var_id"), T=dtype, rounding=rounding, name=name)


def _compensation_list(compensation, variable):
    if compensation is None:
        return []
    _args.check_variable(compensation, "compensation", tf.bfloat16,
                         tf.TensorShape(variable.shape))
    return [_args.resource_handle(compensation, "compensation")]


def _check_sparse(gradient, variable):
    shape = tf.TensorShape(variable.shape)
    if shape.rank == 0:
        raise _args.invalid(f"'gradient' is sparse (IndexedSlices) but 'variable' "
                            f"('{_args.variable_name(variable)}') is a scalar; pass a dense "
                            "gradient.")
    indices = tf.convert_to_tensor(gradient.indices)
    if indices.dtype not in (tf.int32, tf.int64):
        raise _args.invalid(f"Sparse gradient indices have dtype {indices.dtype.name}; "
                            "int32 or int64 expected.")
    values = _args.check_tensor(gradient.values, "gradient.values",
                                tf.TensorShape([None]).concatenate(shape[1:]))
    return values, indices
