"""What `set_policy()` changes in Keras besides the dtype policy, so that a model
that works in float32 works unchanged under the all-bf16 policy.

- **Compiled metrics compute in float32.** A metric is not per-parameter
  state: Keras already keeps its accumulators in float32 (a metric's dtype is
  `floatx()`), but computes its update on whatever the model returns. Under
  the policy that is bf16, which some ops refuse (`TopKCategoricalAccuracy` and
  `SparseTopKCategoricalAccuracy` call `InTopKV2`, float32 only) and which
  makes the others' values coarse (a bf16 cross-entropy or squared error, then
  accumulated in float32). While the policy is active, the compiled metrics
  (`model.compile(metrics=..., weighted_metrics=...)`, updated by `fit`,
  `evaluate`, `train_on_batch`, `test_on_batch` and `compute_metrics`) receive
  16-bit float `y_pred` and `y_true` cast to float32, Keras masks kept. The
  loss is unaffected (Keras's losses already cast to float32).
- **Initializers without a bf16 kernel draw in float32 and cast.** Of Keras
  3.15's initializers only `Orthogonal` has none (TensorFlow's `Qr` has no
  bf16 kernel; LSTM/GRU use it as their default `recurrent_initializer`): while
  the policy is active it draws the float32 orthogonal matrix and rounds it to
  bf16 to nearest (the weight is then orthogonal to bf16 precision, as any bf16
  copy of it would be). Every other Keras initializer draws in bf16 directly.
- **Embedding gradients sum in float32 (JAX backend).** Keras's JAX gradient
  of an `Embedding` lookup is a scatter-add in the table's dtype: each
  occurrence of a token is added to its row in bf16, rounded each time, and on
  a GPU as atomic updates that contend on frequent tokens (18 ms of a 33 ms
  step of a character LM on the H200). While the policy is active, a 16-bit
  table's gradient sums in float32 and is rounded once to the table's dtype
  (`tf_bf16.backend.jax.embedding_lookup`); the lookup itself is unchanged. On
  TensorFlow the gradient is an `IndexedSlices` of the occurrences, which the
  tf_bf16 optimizers sum in float32 already: nothing changes there.

Each hook is installed once, by `set_policy()`, and does nothing while the
policy is off (`reset_policy()`): importing tf_bf16 changes nothing in Keras.

Not here: the strict check and BatchNormalization's moving statistics
(tf_bf16.policy).
"""

import functools

import keras
from keras.src import backend as keras_backend
from keras.src import tree
from keras.src.initializers import random_initializers
from keras.src.trainers import compile_utils

_NARROW_FLOATS = ("bfloat16", "float16")

# Initializers whose TensorFlow ops have no bf16 kernel (checked for every
# initializer of Keras 3.15 by tests/test_policy.py).
FLOAT32_DRAWN_INITIALIZERS = (random_initializers.Orthogonal,)

_INSTALLED = False


def install(is_active):
    """Installs the hooks once; each applies only while `is_active()` is true."""
    global _INSTALLED
    if _INSTALLED:
        return
    _wrap_compiled_metrics(is_active)
    for cls in FLOAT32_DRAWN_INITIALIZERS:
        _wrap_initializer(cls, is_active)
    _EMBEDDING_HOOK["policy_active"] = is_active
    _wrap_embedding()
    _INSTALLED = True


# When the Embedding hook applies: while the policy is active (`install`), or
# always after `float32_embedding_gradients()`.
_EMBEDDING_HOOK = {"policy_active": lambda: False, "forced": False, "installed": False}


def float32_embedding_gradients(enabled=True):
    """Embedding gradients sum in float32 with or without the policy (`enabled`),
    or only under it again (`enabled=False`). JAX backend; nothing changes on
    TensorFlow. For comparing plain bf16 training (Keras's "bfloat16" policy)
    with the policy's so that only the weight rounding differs
    (`python -m tf_bf16 compare`'s nearest)."""
    _EMBEDDING_HOOK["forced"] = bool(enabled)
    if enabled:
        _wrap_embedding()


def _embedding_hook_applies():
    return _EMBEDDING_HOOK["forced"] or _EMBEDDING_HOOK["policy_active"]()


def embedding_gradient_sums():
    """How a 16-bit Embedding table's gradient is summed now: "float32" (the
    hook applies) or "table dtype" (Keras's scatter-add; always on TensorFlow,
    whose gradient is an IndexedSlices that the tf_bf16 optimizers sum in float32)."""
    applies = _EMBEDDING_HOOK["installed"] and _embedding_hook_applies()
    return "float32" if applies else "table dtype"


def _wrap_embedding():
    if _EMBEDDING_HOOK["installed"] or keras.backend.backend() != "jax":
        return
    from tf_bf16.backend import ops

    original = keras.layers.Embedding.call

    @functools.wraps(original)
    def call(self, inputs):
        table = self.embeddings
        if not (_embedding_hook_applies() and self.quantization_mode is None
                and not getattr(self, "lora_enabled", False)
                and keras.backend.standardize_dtype(table.dtype) in _NARROW_FLOATS):
            return original(self, inputs)
        if inputs.dtype not in ("int32", "int64"):
            inputs = keras.ops.cast(inputs, "int32")
        outputs = ops.embedding_lookup(keras.ops.convert_to_tensor(table),
                                       keras.ops.convert_to_tensor(inputs))
        return keras.ops.cast(outputs, dtype=self.compute_dtype)

    keras.layers.Embedding.call = call
    _EMBEDDING_HOOK["installed"] = True


def to_float32(value):
    """16-bit float tensors in a nested structure cast to float32, Keras masks kept."""
    def cast(tensor):
        if tensor is None or not hasattr(tensor, "dtype"):
            return tensor
        if keras.backend.standardize_dtype(tensor.dtype) not in _NARROW_FLOATS:
            return tensor
        mask = keras_backend.get_keras_mask(tensor)
        result = keras.ops.cast(tensor, "float32")
        if mask is not None:
            keras_backend.set_keras_mask(result, mask)
        return result
    return tree.map_structure(cast, value)


def _wrap_compiled_metrics(is_active):
    original = compile_utils.CompileMetrics.update_state

    @functools.wraps(original)
    def update_state(self, y_true, y_pred, sample_weight=None):
        if is_active():
            y_true, y_pred = to_float32(y_true), to_float32(y_pred)
        return original(self, y_true, y_pred, sample_weight=sample_weight)

    compile_utils.CompileMetrics.update_state = update_state


def _wrap_initializer(cls, is_active):
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self, shape, dtype=None):
        if dtype is not None and is_active() and \
                keras.backend.standardize_dtype(dtype) in _NARROW_FLOATS:
            return keras.ops.cast(original(self, shape, dtype="float32"), dtype)
        return original(self, shape, dtype=dtype)

    cls.__call__ = __call__
