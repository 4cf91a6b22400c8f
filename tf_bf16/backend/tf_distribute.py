"""What tf.distribute needs to train pure-bf16 Keras models: bf16 gaps in its collectives.

For: the TensorFlow backend under `MirroredStrategy` and
`MultiWorkerMirroredStrategy` (docs/distributed.md). Imported by
`tf_bf16.backend.tensorflow`, which calls `install()`.

- **Variable creation.** `MultiWorkerMirroredStrategy` broadcasts every new
  variable's initial value from worker 0 with `CollectiveBcastSend`, which has
  no bf16 kernel: creating a bf16 model in its scope fails in stock
  TensorFlow 2.21 ("Value for attr 'T' of bfloat16 is not in the list of
  allowed values"). `install()` makes the broadcast carry a
  bf16 initial value as float16 of the same bits (`tf.bitcast`; a broadcast
  copies bytes, no arithmetic) and turn it back into bf16: no float32 copy.
- **Sparse gradients.** tf.distribute sums `IndexedSlices` (an Embedding's
  gradient) by all-gathering their rows, and the all-gather has no bf16
  kernel either ("DataType bfloat16 not in list of allowed values", with
  `MirroredStrategy` too): `all_reduce_sum_gradients` sends the rows the same
  way.
- **The default seed.** `seed=None` draws a seed in each process; workers
  must round with the same bits: `agreed_seed` takes worker 0's.

Not here: dense gradients, which tf.distribute all-reduces in their own dtype
(bf16), as Keras asks it to.
"""

import functools

import tensorflow as tf


def _is_bf16_slices(gradient):
    return isinstance(gradient, tf.IndexedSlices) and gradient.values.dtype == tf.bfloat16


def all_reduce_sum_gradients(all_reduce, grads_and_vars):
    """Keras's gradient all-reduce (`all_reduce`), with bf16 `IndexedSlices`
    carried bit for bit.

    The rows travel reinterpreted as float16 (`tf.bitcast`: the same 16 bits,
    the same bytes; a gather only copies them) and are reinterpreted as bf16
    after it; the table is never copied or converted. The optimizer then sums
    duplicate rows in float32, as on one replica. (Not int16, which the
    gather refuses, nor int32 pairs, which MirroredStrategy sends down another
    reduction path than the float gradients beside them.)
    """
    grads_and_vars = list(grads_and_vars)
    if not any(_is_bf16_slices(g) for g, _ in grads_and_vars):
        return all_reduce(grads_and_vars)
    packed = [(tf.IndexedSlices(tf.bitcast(g.values, tf.float16), g.indices, g.dense_shape), v)
              if _is_bf16_slices(g) else (g, v) for g, v in grads_and_vars]
    reduced = all_reduce(packed)
    return [(tf.IndexedSlices(tf.bitcast(r.values, tf.bfloat16), r.indices, r.dense_shape), v)
            if _is_bf16_slices(g) else (r, v)
            for (g, _), (r, v) in zip(grads_and_vars, reduced)]


def _num_workers(strategy):
    return getattr(strategy.extended, "_num_workers", 1)


def agreed_seed(optimizer, seed):
    """`seed` as worker 0 drew it, under a multi-worker strategy.

    A variable created in a multi-worker strategy's scope starts with worker
    0's initial value on every worker (the strategy broadcasts it), so this
    one carries worker 0's seed. One worker: `seed` unchanged.
    """
    strategy = getattr(optimizer, "_distribution_strategy", None) or tf.distribute.get_strategy()
    if _num_workers(strategy) <= 1:
        return seed
    with tf.init_scope(), strategy.scope():   # eagerly, also when built inside a tf.function
        chief_seed = tf.Variable(seed, dtype=tf.int64, trainable=False,
                                 name="tf_bf16_seed_broadcast")
        return int(chief_seed.numpy())


def _is_bf16(dtype):
    return dtype is not None and tf.as_dtype(dtype) == tf.bfloat16


def install():
    """Lets MultiWorkerMirroredStrategy create bf16 variables (see the module
    docstring). Idempotent; does nothing where TensorFlow's internals differ
    from 2.21's."""
    try:
        from tensorflow.python.distribute import collective_all_reduce_strategy
        from tensorflow.python.trackable import base as trackable
    except ImportError:
        return
    extended = getattr(collective_all_reduce_strategy, "CollectiveAllReduceExtended", None)
    if extended is None or getattr(extended, "_tf_bf16_installed", False):
        return
    original_initial_value = getattr(extended, "_get_variable_creator_initial_value", None)
    if original_initial_value is None:
        return

    @functools.wraps(original_initial_value)
    def initial_value(self, replica_id, device, primary_var, **kwargs):
        if replica_id != 0 or not _is_bf16(kwargs.get("dtype")):
            return original_initial_value(self, replica_id, device, primary_var, **kwargs)
        value = kwargs["initial_value"]

        def as_float16():
            bf16 = value() if callable(value) else value
            if isinstance(bf16, trackable.CheckpointInitialValue):
                bf16 = bf16.wrapped_value
            return tf.bitcast(tf.convert_to_tensor(bf16, dtype=tf.bfloat16), tf.float16)

        broadcast = original_initial_value(
            self, replica_id, device, primary_var,
            **dict(kwargs, initial_value=as_float16, dtype=tf.float16))
        return lambda: tf.bitcast(broadcast(), tf.bfloat16)

    extended._get_variable_creator_initial_value = initial_value
    extended._tf_bf16_installed = True
