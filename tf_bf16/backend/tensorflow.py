"""The TensorFlow side of tf_bf16.backend: the compiled ops, on Keras variables.

The update functions are `tf_bf16.ops` itself (the C++ kernels update the
variables in place). What tf.distribute needs besides is in
`tf_bf16.backend.tf_distribute`. Not imported on other backends.
"""

import functools

import tensorflow as tf

from tf_bf16 import _args

from tf_bf16.ops import apply_adam  # noqa: F401
from tf_bf16.ops import apply_lion  # noqa: F401
from tf_bf16.ops import apply_sgd  # noqa: F401
from tf_bf16.ops import rounded_assign_add
from tf_bf16.ops import stochastic_round  # noqa: F401
from tf_bf16.backend.tf_distribute import agreed_seed  # noqa: F401
from tf_bf16.backend.tf_distribute import all_reduce_sum_gradients  # noqa: F401
from tf_bf16.backend import tf_distribute

tf_distribute.install()   # MultiWorkerMirroredStrategy: bf16 variables


def is_sparse(gradient):
    return isinstance(gradient, tf.IndexedSlices)


def dense_gradient(gradient, variable=None, learning_rate=None):
    """IndexedSlices -> dense float32 tensor (duplicate rows summed in float32), its
    indices checked against the variable's rows first (`_args.densified`: a bad
    index raises naming 'indices'; under XLA it makes `learning_rate` NaN, which
    skips the update). Returns the gradient, or (gradient, learning rate) when
    `learning_rate` is given."""
    if isinstance(gradient, tf.IndexedSlices):
        rows = None
        if variable is not None and len(variable.shape) > 0:
            rows = variable.shape[0]
        gradient, learning_rate = _args.densified(gradient, rows, learning_rate)
    return gradient if learning_rate is None else (gradient, learning_rate)


def deduplicated_slices(gradient):
    """Sums the rows of duplicate indices (in float32), as a plain scatter-add would."""
    unique_indices, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(tf.cast(gradient.values, tf.float32), positions,
                                          tf.shape(unique_indices)[0])
    return tf.IndexedSlices(values, unique_indices, gradient.dense_shape)


def moving_average(average, variable, ema_momentum, iterations, rounding, seed, step, var_id):
    """Keras's EMA step on a bf16/float32 `average`, committed with one rounding."""
    not_first_step = tf.cast(tf.not_equal(iterations, 0), tf.float32)
    momentum = not_first_step * ema_momentum
    old = tf.cast(average, tf.float32)
    new = momentum * old + (1.0 - momentum) * tf.cast(variable, tf.float32)
    rounded_assign_add(average, new - old, rounding=rounding, seed=seed, step=step,
                       var_id=var_id)


def accumulate_gradient(accumulator, gradient, rounding, seed, step, var_id):
    """accumulator += gradient, rounded (bf16/float32 accumulators)."""
    rounded_assign_add(accumulator, tf.cast(dense_gradient(gradient), tf.float32),
                       rounding=rounding, seed=seed, step=step, var_id=var_id)


def is_float32_tensor(value):
    """(tensor, whether it is float32): how the moving-statistics hook sees an assign."""
    value = tf.convert_to_tensor(value)
    return value, value.dtype == tf.float32


def statistics_step(optimizer):
    """The step that keys BatchNormalization statistics: the optimizer's raw
    iteration counter, which advances every micro-step under gradient
    accumulation (`optimizer.iterations` would repeat a step k times)."""
    return optimizer._iterations


def statistics_seed(optimizer):
    """The seed of BatchNormalization statistics: a tf_bf16 optimizer's
    `rounding_seed` variable, read when the step runs (so a restored seed is used)."""
    return optimizer.rounding_seed


def install_training_hook(prepare):
    """Runs `prepare(model)` when a TensorFlow trainer makes its train function."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.TensorFlowTrainer.make_train_function

    @functools.wraps(original)
    def make_train_function(self, force=False):
        if force or self.train_function is None:
            prepare(self)
        return original(self, force=force)

    tf_trainer.TensorFlowTrainer.make_train_function = make_train_function
