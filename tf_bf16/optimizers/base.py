"""What every tf_bf16 optimizer adds to its Keras counterpart.

- ``rounding`` ("kahan", "stochastic" or "nearest") and ``seed`` arguments;
- Kahan compensation buffers (bfloat16, one per bfloat16 weight) when
  ``rounding="kahan"``;
- decoupled weight decay folded into the fused update (one rounding per step,
  instead of Keras's separate bf16 ``assign``);
- EMA weights and gradient accumulators updated with the same rounding
  machinery, since they too are bf16 state moved by small increments;
- the strict all-bf16 policy check when the optimizer is built.

Random streams (docs/rounding.md, section 6): weight ``i`` of the optimizer's
variable list uses ``var_id = i``; its EMA copy ``i + 2**32`` and its gradient
accumulator ``i + 2 * 2**32``; the step is the optimizer's iteration counter
(Adam's bias-correction step, ``iterations``, under gradient accumulation), so
a run resumed from a checkpoint draws exactly the bits it would have drawn.
"""

import secrets
import weakref

import keras
import tensorflow as tf
from keras.src.optimizers import optimizer as _keras_optimizer


from tf_bf16 import ops
from tf_bf16 import policy

ROUNDINGS = ("kahan", "stochastic", "nearest")
EMA_STREAM = 1 << 32
GRADIENT_ACCUMULATOR_STREAM = 2 << 32

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
    """IndexedSlices -> dense float32 tensor (Keras applies these optimizers densely)."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(tf.IndexedSlices(
            tf.cast(gradient.values, tf.float32), gradient.indices, gradient.dense_shape))
    return gradient


def deduplicated_slices(gradient):
    """Sums the rows of duplicate indices (in float32), as a plain scatter-add would."""
    unique_indices, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(tf.cast(gradient.values, tf.float32), positions,
                                          tf.shape(unique_indices)[0])
    return tf.IndexedSlices(values, unique_indices, gradient.dense_shape)


class RoundingMixin:
    """Rounding, Kahan buffers, folded weight decay, rounded EMA/accumulators."""

    def _init_rounding(self, rounding, seed):
        self.rounding = check_rounding(rounding)
        self.seed = resolve_seed(seed)

    def _build_rounding(self, variables):
        """Creates the Kahan buffers; call from build() after super().build()."""
        policy.check_optimizer_variables(self, variables)
        self._compensations = []
        for variable in variables:
            needs_buffer = (self.rounding == "kahan"
                            and keras.backend.standardize_dtype(variable.dtype) == "bfloat16")
            self._compensations.append(
                self.add_variable_from_reference(variable, name="kahan_compensation")
                if needs_buffer else None)

    def _stream(self, variable):
        """Keyword arguments of the fused ops for this variable."""
        index = self._get_variable_index(variable)
        return dict(rounding=self.rounding, compensation=self._compensations[index],
                    seed=self.seed, var_id=index)

    def _weight_decay_for(self, variable):
        """Decoupled weight decay of this variable (0 if none or excluded)."""
        if self.weight_decay is None:
            return 0.0
        keras_variable = self._trainable_variables[self._get_variable_index(variable)]
        return self.weight_decay if self._use_weight_decay(keras_variable) else 0.0

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

    def _keras_update_step(self, keras_update_step, gradient, variable, learning_rate):
        """float16/float64 variables (outside the policy): Keras's own update."""
        weight_decay = self._weight_decay_for(variable)
        if weight_decay:
            lr = tf.cast(learning_rate, variable.dtype)
            variable.assign(variable - variable * tf.cast(weight_decay, variable.dtype) * lr)
        return keras_update_step(gradient, variable, learning_rate)

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
                momentum = tf.cast(tf.not_equal(self.iterations, 0), var.dtype) * \
                    tf.cast(self.ema_momentum, var.dtype)
                average.assign(momentum * average + (1 - momentum) * var)
                continue
            not_first_step = tf.cast(tf.not_equal(self.iterations, 0), tf.float32)
            momentum = not_first_step * self.ema_momentum
            old = tf.cast(average, tf.float32)
            new = momentum * old + (1.0 - momentum) * tf.cast(var, tf.float32)
            ops.rounded_assign_add(average, new - old, rounding=self._state_rounding(),
                                   seed=self.seed, step=self._iterations,
                                   var_id=index + EMA_STREAM)

    def _backend_increment_gradient_accumulators(self, grads, acc_grads):
        for grad, accumulator in zip(grads, acc_grads):
            if not has_fused_update(accumulator):
                accumulator.assign(accumulator + tf.cast(dense_gradient(grad), accumulator.dtype))
                continue
            index = next(i for i, a in enumerate(self._accumulated_gradients)
                         if a is accumulator)
            ops.rounded_assign_add(accumulator, tf.cast(dense_gradient(grad), tf.float32),
                                   rounding=self._state_rounding(), seed=self.seed,
                                   step=self._iterations,
                                   var_id=index + GRADIENT_ACCUMULATOR_STREAM)

    def _rounding_config(self):
        return {"rounding": self.rounding, "seed": self.seed}
