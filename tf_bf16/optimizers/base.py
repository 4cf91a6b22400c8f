"""What every tf_bf16 optimizer adds to its Keras counterpart, written once.

An optimizer file (sgd.py, adam.py, ...) holds only its `__init__` (Keras's
arguments and defaults, plus `rounding` and `seed`) and its fused update
(`fused_update_step`). Its class puts `Bf16Optimizer` before the Keras class
it replaces (`class SGD(Bf16Optimizer, keras.optimizers.SGD)`), so that the
methods here wrap Keras's:

- ``rounding`` ("kahan", "stochastic" or "nearest") and ``seed`` arguments,
  saved in the config;
- Kahan compensation buffers (bfloat16, one per bfloat16 weight) when
  ``rounding="kahan"``, created after Keras's slots;
- `update_step`: the fused update on bfloat16 and float32 variables, Keras's
  own update on the others (float16, float64);
- decoupled weight decay folded into the fused update (one rounding per step,
  instead of Keras's separate bf16 ``assign``);
- EMA weights and gradient accumulators updated with the same rounding
  machinery, since they too are bf16 state moved by small increments;
- the strict all-bf16 policy check when the optimizer is built;
- the Keras docstring splice (``{{base_optimizer_keyword_args}}``).

Not here: the update math itself (tf_bf16.ops and the C++ kernels on the
TensorFlow backend, tf_bf16.jax_ops on the JAX backend; `tf_bf16.backend.ops`
is the running backend's) and the policy (tf_bf16.policy).

Random streams (docs/rounding.md, section 6): weight ``i`` of the optimizer's
variable list uses ``var_id = i``; its EMA copy ``i + 2**32`` and its gradient
accumulator ``i + 2 * 2**32``; the step is the optimizer's iteration counter
(Adam's bias-correction step, ``iterations``, under gradient accumulation), so
a run resumed from a checkpoint draws exactly the bits it would have drawn.
"""

import secrets
import weakref

import keras
from keras.src.optimizers import optimizer as _keras_optimizer

from tf_bf16 import backend
from tf_bf16 import policy
from tf_bf16._spec import EMA_STREAM
from tf_bf16._spec import GRADIENT_ACCUMULATOR_STREAM
from tf_bf16._spec import ROUNDINGS
from tf_bf16.backend import ops

# Keras fills its optimizers' docstrings from this text; ours too.
BASE_OPTIMIZER_KEYWORD_ARGS = _keras_optimizer.base_optimizer_keyword_args


def check_rounding(rounding):
    if rounding not in ROUNDINGS:
        raise ValueError(
            f"Argument `rounding` must be one of {ROUNDINGS}. Received: rounding={rounding!r}")
    return rounding


def resolve_seed(seed):
    """An explicit seed, or a fresh random one that is then saved in the config."""
    if seed is None:
        return secrets.randbelow(2**31)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"Argument `seed` must be an int or None. Received: seed={seed!r}")
    return seed


def has_fused_update(variable):
    """The fused ops update bfloat16 and float32 variables; others use Keras's math."""
    return keras.backend.standardize_dtype(variable.dtype) in ("bfloat16", "float32")


def dense_gradient(gradient):
    """IndexedSlices -> dense float32 tensor (Keras applies these optimizers densely);
    dense gradients (all of them on JAX) as they are."""
    return ops.dense_gradient(gradient)


def deduplicated_slices(gradient):
    """Sums the rows of duplicate indices (in float32), as a plain scatter-add would."""
    return ops.deduplicated_slices(gradient)


class Bf16Optimizer:
    """Rounding, Kahan buffers, folded weight decay, rounded EMA/accumulators.

    A mixin placed before a Keras optimizer class; subclasses implement
    `fused_update_step`.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__doc__ is not None:
            cls.__doc__ = cls.__doc__.replace("{{base_optimizer_keyword_args}}",
                                              BASE_OPTIMIZER_KEYWORD_ARGS)

    def __init__(self, *, rounding="kahan", seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rounding = check_rounding(rounding)
        self._seed_drawn = seed is None
        self.seed = resolve_seed(seed)

    def build(self, variables):
        """Creates Keras's slots, then the Kahan compensation buffers."""
        if self.built:
            return
        super().build(variables)
        policy.check_optimizer_variables(self, variables)
        if self._seed_drawn:   # drawn in each process: every worker takes worker 0's
            self.seed = ops.agreed_seed(self, self.seed)
        self._compensations = []
        for variable in variables:
            needs_buffer = (self.rounding == "kahan"
                            and keras.backend.standardize_dtype(variable.dtype) == "bfloat16")
            self._compensations.append(
                self.add_variable_from_reference(variable, name="kahan_compensation")
                if needs_buffer else None)

    def update_step(self, gradient, variable, learning_rate):
        """One fused, in-place update of `variable` (Keras's update for float16/float64)."""
        if has_fused_update(variable):
            return self.fused_update_step(gradient, variable, learning_rate)
        # Outside the policy: Keras's own math, after the weight decay that
        # _apply_weight_decay leaves to the update step.
        weight_decay = self._weight_decay_for(variable)
        if weight_decay:
            lr = keras.ops.cast(learning_rate, variable.dtype)
            variable.assign(
                variable - variable * keras.ops.cast(weight_decay, variable.dtype) * lr)
        return super().update_step(gradient, variable, learning_rate)

    def fused_update_step(self, gradient, variable, learning_rate):
        """The fused update of a bfloat16 or float32 `variable`, weight decay included."""
        raise NotImplementedError(f"{type(self).__name__} must implement fused_update_step.")

    def get_config(self):
        config = super().get_config()
        config.update({"rounding": self.rounding, "seed": self.seed})
        return config

    def _stream(self, variable):
        """Keyword arguments of the fused ops for this variable."""
        index = self._get_variable_index(variable)
        return dict(rounding=self.rounding, compensation=self._compensations[index],
                    seed=self.seed, var_id=index)

    def _weight_decay_for(self, variable):
        """Decoupled weight decay of this variable (0 if none or excluded)."""
        if self.weight_decay is None:
            return 0.0
        # Asked about the variable update_step receives, as Keras's backend asks:
        # on TensorFlow the tf.Variable, whose name is the variable's path
        # ("sequential/dense_a/kernel:0"), so var_names match layer names too.
        return self.weight_decay if self._use_weight_decay(variable) else 0.0

    def _apply_weight_decay(self, variables):
        # Folded into update_step, so each weight is rounded once per step.
        return

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        """Keras's slot creation; the slot remembers its variable (for the strict
        policy's float32 exemptions)."""
        slot = super().add_variable_from_reference(reference_variable, name=name,
                                                   initializer=initializer)
        slot._tf_bf16_slot_of = weakref.ref(reference_variable)
        return slot

    def _state_rounding(self):
        """Rounding for bf16 state without a Kahan buffer (EMA, accumulators)."""
        return "nearest" if self.rounding == "nearest" else "stochastic"

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        for index, (var, average) in enumerate(
                zip(trainable_variables, self._model_variables_moving_average)):
            if average is None:
                continue
            if not has_fused_update(average):  # Keras's own EMA, in the variable's dtype
                momentum = keras.ops.cast(keras.ops.not_equal(self.iterations, 0), var.dtype) * \
                    keras.ops.cast(self.ema_momentum, var.dtype)
                average.assign(momentum * average + (1 - momentum) * var)
                continue
            ops.moving_average(average, var, self.ema_momentum, self.iterations,
                               rounding=self._state_rounding(), seed=self.seed,
                               step=self._iterations, var_id=index + EMA_STREAM)

    def _overwrite_model_variables_with_average_value(self, trainable_variables):
        if backend.NAME != "jax":
            return super()._overwrite_model_variables_with_average_value(trainable_variables)
        # Keras assigns the average's array itself: the weight and its average then
        # share one buffer, and the next `fit` (whose train step donates its state)
        # fails ("Attempt to donate the same buffer twice"; stock Keras 3.15.1 too).
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                var.assign(keras.ops.copy(average.value))

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # TensorFlow's optimizer under tf.distribute; bf16 IndexedSlices need help there.
        return ops.all_reduce_sum_gradients(super()._all_reduce_sum_gradients, grads_and_vars)

    def _backend_apply_gradients(self, grads, trainable_variables):
        if self.gradient_accumulation_steps and backend.NAME == "jax":
            # Keras's JAX optimizer adds accumulators in bf16, rounded to nearest.
            return ops.apply_gradients_accumulating(self, grads, trainable_variables)
        return super()._backend_apply_gradients(grads, trainable_variables)

    def _backend_increment_gradient_accumulators(self, grads, acc_grads):
        for grad, accumulator in zip(grads, acc_grads):
            if not has_fused_update(accumulator):
                accumulator.assign(
                    accumulator + keras.ops.cast(dense_gradient(grad), accumulator.dtype))
                continue
            index = next(i for i, a in enumerate(self._accumulated_gradients)
                         if a is accumulator)
            ops.accumulate_gradient(accumulator, grad, rounding=self._state_rounding(),
                                    seed=self.seed, step=self._iterations,
                                    var_id=index + GRADIENT_ACCUMULATOR_STREAM)
