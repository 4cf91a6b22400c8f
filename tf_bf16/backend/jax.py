"""The JAX side of tf_bf16.backend: `tf_bf16.jax_ops` on Keras variables.

Each update function reads its Keras variables' values, calls the pure
function of the same name in `tf_bf16.jax_ops` and assigns the results.
Inside Keras's jitted, stateless train step the values read are the traced
state and an assign records the new value in Keras's `StatelessScope`, so
the update compiles into the train step; outside one (eager use) it assigns.

Also here, because the JAX trainer differs from the TensorFlow one:

- gradient accumulation (`apply_gradients_accumulating`): Keras's JAX
  optimizer sums accumulators with a bf16 add rounded to nearest; tf_bf16
  rounds them as on TensorFlow (stochastically);
- the step that keys BatchNormalization statistics (`statistics_step`):
  inside the jitted train step a read of `optimizer.iterations` is a
  trace-time constant, so the trainer hook below hands the traced iteration
  count to the moving-statistics rounding;
- the trainer hook itself (`install_training_hook`);
- the Embedding lookup whose gradient sums in float32 (`embedding_lookup`).

Not imported on other backends; imports no TensorFlow.
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax import lax

from tf_bf16 import jax_ops
from tf_bf16._spec import GRADIENT_ACCUMULATOR_STREAM


def _value(x):
    """A Keras variable's value (traced inside a stateless scope); anything else as is."""
    return x.value if isinstance(x, keras.Variable) else x


def _path(variable):
    return getattr(variable, "path", None)


def _assign(targets, new_values):
    for role, value in new_values.items():
        targets[role].assign(value)


def _check_distinct(**roles):
    """The Keras variables of one update are different variables (as tf_bf16.ops
    requires): the same one in two roles would be assigned twice, the last write
    winning. (`tf_bf16.jax_ops`, a pure function of arrays, accepts one array in
    several roles: `m = v = jnp.zeros_like(w)` is a fine initial state.)"""
    seen = {}
    for role, variable in roles.items():
        if variable is None:
            continue
        for other_role, other in seen.items():
            if variable is other:
                raise ValueError(
                    f"'{other_role}' and '{role}' are the same variable ('{_path(variable)}'): "
                    "the weight, each optimizer slot and the compensation buffer must be "
                    "different variables. Nothing was updated.")
        seen[role] = variable


def stochastic_round(x, seed, step=0, var_id=0, name=None):
    """`jax_ops.stochastic_round`; the rounding has no gradient (stop_gradient)."""
    return jax_ops.stochastic_round(lax.stop_gradient(_value(x)), seed, _value(step),
                                    var_id, name=name)


def rounded_assign_add(variable, delta, rounding="stochastic", compensation=None, seed=0,
                       step=0, var_id=0, name=None):
    _check_distinct(variable=variable, compensation=compensation)
    new = jax_ops.rounded_assign_add(
        variable.value, _value(delta), rounding=rounding, compensation=_value(compensation),
        seed=_value(seed), step=_value(step), var_id=var_id, name=_path(variable))
    _assign({"variable": variable, "compensation": compensation}, new)


def apply_sgd(variable, gradient, learning_rate, momentum=0.0, accumulator=None,
              nesterov=False, weight_decay=0.0, rounding="stochastic", compensation=None,
              seed=0, step=0, var_id=0, name=None):
    _check_distinct(variable=variable, accumulator=accumulator, compensation=compensation)
    new = jax_ops.apply_sgd(
        variable.value, gradient, _value(learning_rate), momentum=_value(momentum),
        accumulator=_value(accumulator), nesterov=nesterov, weight_decay=_value(weight_decay),
        rounding=rounding, compensation=_value(compensation), seed=_value(seed), step=_value(step),
        var_id=var_id, name=_path(variable))
    _assign({"variable": variable, "accumulator": accumulator, "compensation": compensation},
            new)


def apply_adam(variable, gradient, m, v, learning_rate, beta_1=0.9, beta_2=0.999,
               epsilon=1e-7, step=0, vhat=None, weight_decay=0.0, rounding="stochastic",
               compensation=None, seed=0, var_id=0, name=None):
    _check_distinct(variable=variable, m=m, v=v, vhat=vhat, compensation=compensation)
    new = jax_ops.apply_adam(
        variable.value, gradient, m.value, v.value, _value(learning_rate),
        beta_1=_value(beta_1), beta_2=_value(beta_2), epsilon=_value(epsilon),
        step=_value(step), vhat=_value(vhat), weight_decay=_value(weight_decay),
        rounding=rounding, compensation=_value(compensation), seed=_value(seed), var_id=var_id,
        name=_path(variable))
    _assign({"variable": variable, "m": m, "v": v, "vhat": vhat, "compensation": compensation},
            new)


def apply_lion(variable, gradient, m, learning_rate, beta_1=0.9, beta_2=0.99,
               weight_decay=0.0, rounding="stochastic", compensation=None, seed=0, step=0,
               var_id=0, name=None):
    _check_distinct(variable=variable, m=m, compensation=compensation)
    new = jax_ops.apply_lion(
        variable.value, gradient, m.value, _value(learning_rate), beta_1=_value(beta_1),
        beta_2=_value(beta_2), weight_decay=_value(weight_decay), rounding=rounding,
        compensation=_value(compensation), seed=_value(seed), step=_value(step), var_id=var_id,
        name=_path(variable))
    _assign({"variable": variable, "m": m, "compensation": compensation}, new)


def agreed_seed(optimizer, seed):
    """`seed` as process 0 drew it, when JAX runs several processes
    (`jax.distributed`): a default seed is drawn in each process, and replicas
    of one array must round with the same bits. One process: `seed` unchanged."""
    import jax

    if jax.process_count() == 1:
        return seed
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(seed)))


def is_sparse(gradient):
    """JAX gradients are dense arrays (an Embedding's too)."""
    return False


def dense_gradient(gradient, variable=None, learning_rate=None):
    """JAX gradients are dense already; the same results as on TensorFlow."""
    return gradient if learning_rate is None else (gradient, learning_rate)


def deduplicated_slices(gradient):
    raise TypeError("JAX gradients are dense; there are no slices to deduplicate.")


def moving_average(average, variable, ema_momentum, iterations, rounding, seed, step, var_id):
    """Keras's EMA step on a bf16/float32 `average`, as on TensorFlow (see jax_ops)."""
    not_first_step = (jnp.asarray(_value(iterations)) != 0).astype(jnp.float32)
    momentum = not_first_step * jnp.float32(ema_momentum)   # 0 or float32(ema_momentum): exact
    new = jax_ops.moving_average(average.value, variable.value, momentum, rounding=rounding,
                                 seed=_value(seed), step=_value(step), var_id=var_id,
                                 name=_path(average))
    average.assign(new["variable"])


def accumulate_gradient(accumulator, gradient, rounding, seed, step, var_id):
    """accumulator += gradient, rounded (bf16/float32 accumulators)."""
    rounded_assign_add(accumulator, gradient, rounding=rounding, seed=_value(seed), step=step,
                       var_id=var_id)


def _keras_average(gradient, accumulated, steps):
    """Keras's `(g + accumulator) / steps`, with TensorFlow's bits.

    On TensorFlow each bf16 operation is a float32 operation rounded to
    nearest bf16; here the same, built from jax_ops' bit operations so that no
    XLA pass can skip a rounding. Other dtype combinations: Keras's own math.
    """
    gradient = jnp.asarray(gradient)
    dtype = accumulated.dtype
    if gradient.dtype != dtype or dtype not in (jnp.bfloat16, jnp.float32):
        return (gradient + accumulated) / steps
    f = jax_ops.Float32Arithmetic()
    total = f.add(jax_ops.flush_denormal(jax_ops.load(gradient)),
                  jax_ops.flush_denormal(jax_ops.load(accumulated)))
    if dtype == jnp.float32:
        return f.div(total, jnp.float32(steps))
    # TensorFlow converts `steps` to the tensor's dtype before dividing.
    divisor = jax_ops.load(jax_ops.round_nearest(jnp.float32(steps)))
    total = jax_ops.flush_denormal(jax_ops.load(jax_ops.round_nearest(total)))
    return jax_ops.round_nearest(f.div(total, divisor))


def apply_gradients_accumulating(optimizer, grads, trainable_variables):
    """`JaxOptimizer._backend_apply_gradients` with gradient accumulation, tf_bf16's way.

    As Keras on JAX: every step computes both branches and selects (no
    stateful conditionals under `jit`). Unlike it: the accumulators are
    rounded like the TensorFlow path's (`accumulate_gradient`) and the update
    step's `(g + accumulator) / steps` has TensorFlow's bits.
    """
    steps = optimizer.gradient_accumulation_steps
    is_update_step = (optimizer._iterations + 1) % steps == 0
    iterations = optimizer._iterations.value
    indices = [optimizer._get_variable_index(v) for v in trainable_variables]
    accumulators = [optimizer._accumulated_gradients[i] for i in indices]
    variables_before = [v.value for v in trainable_variables]
    optimizer_before = [v.value for v in optimizer.variables]

    accumulated = []
    for index, gradient, accumulator in zip(indices, grads, accumulators):
        if accumulator.dtype in ("bfloat16", "float32"):
            accumulated.append(jax_ops.rounded_assign_add(
                accumulator.value, gradient, rounding=optimizer._state_rounding(),
                seed=_value(optimizer.rounding_seed), step=iterations,
                var_id=index + GRADIENT_ACCUMULATOR_STREAM)["variable"])
        else:
            accumulated.append(gradient + accumulator.value)
    averaged = [_keras_average(g, a.value, steps) for g, a in zip(grads, accumulators)]

    averaged = optimizer._clip_gradients(averaged)
    optimizer._apply_weight_decay(trainable_variables)
    optimizer._backend_update_step(averaged, trainable_variables, optimizer.learning_rate)

    variables_after = lax.cond(is_update_step, lambda: [v.value for v in trainable_variables],
                               lambda: variables_before)
    optimizer_after = lax.cond(is_update_step, lambda: [v.value for v in optimizer.variables],
                               lambda: optimizer_before)
    for variable, value in zip(trainable_variables, variables_after):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, optimizer_after):
        variable.assign(value)
    accumulated = lax.cond(is_update_step, lambda: [jnp.zeros_like(a) for a in accumulated],
                           lambda: accumulated)
    for accumulator, value in zip(accumulators, accumulated):
        accumulator.assign(value)

    if optimizer.use_ema:
        optimizer._update_model_variables_moving_average(optimizer._trainable_variables)
        if optimizer.ema_overwrite_frequency:
            overwrite = (optimizer.iterations + 1) % optimizer.ema_overwrite_frequency == 0
            for variable, average in zip(optimizer._trainable_variables,
                                         optimizer._model_variables_moving_average):
                if average is not None:
                    variable.assign(jnp.where(overwrite, average.value, variable.value))


# ---------------------------------------------------------------------------
# Embedding gradients


@jax.custom_vjp
def embedding_lookup(table, ids):
    """``jnp.take(table, ids, axis=0)`` (Keras's Embedding lookup on JAX), whose
    gradient sums the rows of repeated ids in float32 and rounds the sum once
    to the table's dtype (round to nearest even).

    Keras's own gradient is a scatter-add in the table's dtype: for a bf16
    table, every occurrence of a token is added in bf16 (each add rounded, so
    a row's sum loses the small contributions, as a bf16 weight loses small
    updates), and on a GPU as atomic updates that contend on the rows of
    frequent tokens: on the H200, a 101M-parameter character LM's token-table
    gradient took 18 ms of a 33 ms step on text (0.3 ms on uniform random
    ids; under 0.1 ms with a float32 table; docs/bench_gpu.md). On a GPU the
    float32 adds are atomics in no fixed order: a row's float32 sum can differ
    in its last bits from run to run and, rarely, round to another bf16 value
    (XLA_FLAGS=--xla_gpu_deterministic_ops=true fixes the order).
    """
    return jnp.take(table, ids, axis=0)


def _embedding_lookup_forward(table, ids):
    # The table itself as the residual: only its shape and dtype are read, and
    # it is alive anyway (a weight).
    return jnp.take(table, ids, axis=0), (table, ids)


def _embedding_lookup_backward(residual, cotangent):
    table, ids = residual
    # The transpose of the same lookup (Keras's scatter-add, same index
    # semantics), on a float32 table.
    transpose = jax.linear_transpose(lambda t: jnp.take(t, ids, axis=0),
                                     jax.ShapeDtypeStruct(table.shape, jnp.float32))
    (summed,) = transpose(cotangent.astype(jnp.float32))
    return summed.astype(table.dtype), None


embedding_lookup.defvjp(_embedding_lookup_forward, _embedding_lookup_backward)


# ---------------------------------------------------------------------------
# The step of BatchNormalization statistics, and the trainer hook


_OPTIMIZER_STATE = contextvars.ContextVar("tf_bf16_optimizer_state", default=None)


@contextlib.contextmanager
def optimizer_state(optimizer, optimizer_variables):
    """Within: `statistics_step(optimizer)` reads the iteration count from
    `optimizer_variables` (the values, traced under `jit`, that a stateless
    train step passes for `optimizer.variables`)."""
    token = _OPTIMIZER_STATE.set((optimizer, list(optimizer_variables)))
    try:
        yield
    finally:
        _OPTIMIZER_STATE.reset(token)


def _traced_optimizer_value(optimizer, variable):
    """`variable`'s value in the train step's traced optimizer state, else its value."""
    state = _OPTIMIZER_STATE.get()
    if state is not None and state[0] is optimizer:
        for candidate, value in zip(optimizer.variables, state[1]):
            if candidate is variable:
                return value
    return variable.value


def statistics_step(optimizer):
    """The step that keys BatchNormalization statistics: the optimizer's raw
    iteration counter (which advances every micro-step under gradient
    accumulation), read from the train step's traced optimizer state when
    there is one."""
    return _traced_optimizer_value(optimizer, optimizer._iterations)


def statistics_seed(optimizer):
    """The seed of BatchNormalization statistics: a tf_bf16 optimizer's
    `rounding_seed` (traced in the train step, so a restored seed is used)."""
    return _traced_optimizer_value(optimizer, optimizer.rounding_seed)


def is_float32_tensor(value):
    """(array, whether it is float32): how the moving-statistics hook sees an assign."""
    value = jnp.asarray(_value(value))
    return value, value.dtype == jnp.float32


def install_training_hook(prepare):
    """Runs `prepare(model)` when a JAX trainer makes its train function, and
    hands the traced optimizer state to `statistics_step` in every train step."""
    from keras.src.backend.jax import trainer as jax_trainer

    trainer = jax_trainer.JAXTrainer
    original_make = trainer.make_train_function
    original_compute = trainer.compute_loss_and_updates

    @functools.wraps(original_make)
    def make_train_function(self, force=False):
        if force or self.train_function is None:
            prepare(self)
        return original_make(self, force=force)

    @functools.wraps(original_compute)
    def compute_loss_and_updates(self, *args, **kwargs):
        optimizer_variables = kwargs.get("optimizer_variables")
        optimizer = getattr(self, "optimizer", None)
        if optimizer_variables is None or optimizer is None:
            return original_compute(self, *args, **kwargs)
        with optimizer_state(optimizer, optimizer_variables):
            return original_compute(self, *args, **kwargs)

    trainer.make_train_function = make_train_function
    trainer.compute_loss_and_updates = compute_loss_and_updates
