"""The one place where tf_bf16 picks its implementation for the running Keras backend.

`tf_bf16.backend.ops` is `tf_bf16.backend.tensorflow` under
``KERAS_BACKEND=tensorflow`` and `tf_bf16.backend.jax` under
``KERAS_BACKEND=jax``. Both provide the same small API, the one
`tf_bf16.optimizers` and `tf_bf16.policy` call:

- the update functions of `tf_bf16.ops` (`stochastic_round`,
  `rounded_assign_add`, `apply_sgd`, `apply_adam`, `apply_lion`), with the same
  arguments, updating Keras variables in place (on JAX: by assigning the new
  values that `tf_bf16.jax_ops` computes, which inside Keras's stateless train
  step records them);
- what the Keras integration does around them: sparse gradients
  (`dense_gradient`, `deduplicated_slices`), the EMA step
  (`moving_average`), gradient accumulation (`accumulate_gradient`), and the
  hook that runs the strict-policy check when a trainer makes its train
  function (`install_training_hook`).

Only the module of the running backend is imported, so TensorFlow (and the
compiled op library) load only on the TensorFlow backend, and JAX only on
the JAX backend. Not here: the update math (tf_bf16.ops and the C++ kernels;
tf_bf16.jax_ops).
"""

import keras

NAME = keras.backend.backend()

if NAME == "tensorflow":
    from tf_bf16.backend import tensorflow as ops
elif NAME == "jax":
    from tf_bf16.backend import jax as ops
else:
    raise ImportError(
        f"tf_bf16 runs on Keras's TensorFlow and JAX backends; KERAS_BACKEND is {NAME!r}. "
        "Set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax before importing keras.")

__all__ = ["NAME", "ops"]
