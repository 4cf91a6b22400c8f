"""Losses that compute in bfloat16 where that is sound.

`bf16_loss(loss)` turns a softmax cross-entropy on logits
(`SparseCategoricalCrossentropy` / `CategoricalCrossentropy` with
`from_logits=True`) into `BFloat16SoftmaxCrossEntropy`, which keeps the loss,
its gradient and the softmax in bf16 with a cancellation-free gradient; the
docstring of `bf16_loss` says why that is sound and why the other Keras losses
are not offered. `tf_bf16.audit` recommends it where a compiled loss upcasts to
float32.

Not here: the optimizers' rounding (tf_bf16.optimizers) and the audit
(tf_bf16.auditing).
"""

import keras
import tensorflow as tf
from keras.src import backend as _keras_backend
from keras.src.losses import loss as _keras_loss

__all__ = ["bf16_loss", "BFloat16SoftmaxCrossEntropy", "softmax_cross_entropy_bf16"]


def bf16_loss(loss, from_logits=None):
    """Softmax cross-entropy on logits computed entirely in bfloat16.

    Returns a `BFloat16SoftmaxCrossEntropy` to pass to `model.compile(loss=...)`
    in place of a `SparseCategoricalCrossentropy(from_logits=True)` or a
    `CategoricalCrossentropy(from_logits=True)` (one-hot labels). Keras
    losses cast `y_pred` to float32 (floatx), so the loss, its gradient and
    the softmax run in 32 bits; this loss keeps every float tensor of the
    loss and of its gradient in bf16 (the traced step has only the scalar
    total in float32, which Keras casts to floatx for its loss tracker).

    What it computes, per example (logits `z` in bf16, label `y`, `m = max z`,
    `d = z - m <= 0`, `e = exp(d)`, so `e[argmax] = 1`):

    ```
    tail  = sum of e over the classes other than argmax(z)     (>= 0)
    loss  = log1p(tail) - d[y]                                  (two terms >= 0)
    dL/dz_j = e_j / (1 + tail)                                 j != y
    dL/dz_y = -(sum of e over the classes other than y) / (1 + tail)
    ```

    Why this is sound (and a plain bf16 cross-entropy is not). `u = 2^-8` is
    bf16's unit roundoff (half the spacing just above 1.0):

    - The textbook gradient `softmax(z) - onehot(y)` cancels for the label
      class: once the model is confident (`p_y > 1 - 2^-9`), `p_y` rounds to
      1.0 and the label's gradient is exactly 0 while the other classes still
      get theirs, so confident examples stop pulling their logit up and the
      gradient no longer sums to zero. Here `1 - p_y` is a sum of the other
      classes' positive terms, never `1 - p_y`: every gradient element keeps
      a small *relative* error whatever the confidence. To first order it is
      at most `(|d_j| + max_k |d_k| + 6) * u` (rounding of `d`, of `exp`, of
      the sums, of `1 + tail`, of the division), which `tests/test_audit.py`
      checks against a float64 reference.
    - The loss value `log(sum exp d)` would round to 0 for confident examples
      (`1 + tail` is 1.0 once `tail <= u`); `log1p(tail)` keeps its relative
      precision, and adding `-d[y] >= 0` cannot cancel.
    - The largest error term is the rounding of `d = z - m` (exact when `z_j`
      and `m` are within a factor 2, otherwise up to `|d| * u`), which changes
      `p_j` by a relative `|d| * u`. That is the order of the quantization the
      bf16 logits already carry: one ulp of a logit of size `|z|` (between
      `|z| * u` and `|z| * 2u`) moves its probability by that much relative.
      The large-`|d|` elements are the tiny probabilities (`e^-20`...), whose
      absolute contribution is negligible. It is not float32 accuracy: the
      float32 path computes the gradient of the bf16 logits to ~1e-7.
    - The batch mean is computed in bf16 too: its gradient is the constant
      `1/N` (rounded: one uniform scale error of at most `u`, like a
      learning-rate change below 0.4%), so the *gradient* does not depend on
      the mean's precision. The *reported* loss value does: 2 to 3
      significant digits. Sample weights are cast to bf16 (relative error up
      to `u` each).

    What is not offered, and why:

    - `from_logits=False` (a softmax layer before the loss): a probability
      above `1 - 2^-9` rounds to 1.0 in bf16, whose log is 0, and the gradient
      `-1/p * dp` inherits the cancellation above. Remove the softmax and use
      logits.
    - Soft labels / `label_smoothing`: their gradient `p - y` cancels near the
      optimum (`p ~= y`) in any formulation, leaving bf16 rounding noise of
      `p * u`; not sound in bf16. One-hot labels are checked in the graph
      (a failing assertion, not a silent change of meaning).
    - Regression losses (MSE, MAE, Huber): the per-element math is easy, but
      the targets must be cast to bf16, which rounds each target by up to
      `|y| * u`; residuals smaller than that are lost (a target of 1001.3
      becomes 1000, where the bf16 spacing is 4). That is only sound when the
      targets are exactly representable in bf16, which a loss cannot know.
      Their float32 cost is elementwise over the outputs only; they are left
      in float32.
    - Integer labels are not cast to bf16 (labels above 256 are not exact in
      bf16); they stay integers.

    Args:
        loss: a `keras.losses.SparseCategoricalCrossentropy` or
            `keras.losses.CategoricalCrossentropy` instance with
            `from_logits=True` (no `ignore_class`, `label_smoothing=0`, last
            axis), or the name `"sparse_categorical_crossentropy"` /
            `"categorical_crossentropy"` together with `from_logits=True`.
        from_logits: only with a loss name; must be `True`.

    Returns:
        A `BFloat16SoftmaxCrossEntropy` with the same name and reduction.

    Raises:
        ValueError: for a configuration that has no sound bf16 form (the
            message says why), or `TypeError` for another kind of loss.
    """
    if isinstance(loss, str):
        name = loss.lower()
        if name not in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
            raise TypeError(_unsupported_loss_message(loss))
        if from_logits is not True:
            raise ValueError(
                f"bf16_loss('{loss}'): a loss name means from_logits=False (probabilities). "
                "In bf16 a probability above 1 - 2^-9 rounds to 1 (log 0) and its gradient "
                "cancels; there is no sound bf16 form. Output logits and pass "
                "from_logits=True.")
        return BFloat16SoftmaxCrossEntropy(sparse=name.startswith("sparse"), name=f"bf16_{name}")
    if isinstance(loss, BFloat16SoftmaxCrossEntropy):
        return loss
    if from_logits is not None:
        raise ValueError("bf16_loss: `from_logits` goes with a loss name; a loss instance "
                         "carries its own.")
    sparse = isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
    if not sparse and not isinstance(loss, keras.losses.CategoricalCrossentropy):
        raise TypeError(_unsupported_loss_message(loss))
    config = loss.get_config()
    what = type(loss).__name__
    if not config.get("from_logits", False):
        raise ValueError(
            f"bf16_loss({what}(from_logits=False)): the cross-entropy of probabilities has "
            "no sound bf16 form (a probability above 1 - 2^-9 rounds to 1, log 0, and its "
            "gradient cancels). Remove the final softmax and use from_logits=True.")
    if config.get("ignore_class") is not None:
        raise ValueError(f"bf16_loss({what}): ignore_class is not supported; mask with "
                         "sample weights instead.")
    if config.get("label_smoothing"):
        raise ValueError(
            f"bf16_loss({what}(label_smoothing={config['label_smoothing']})): smoothed "
            "labels make the gradient p - y cancel near the optimum, leaving bf16 rounding "
            "noise; not sound in bf16.")
    if config.get("axis", -1) != -1:
        raise ValueError(f"bf16_loss({what}): only axis=-1 is supported.")
    return BFloat16SoftmaxCrossEntropy(sparse=sparse, name=f"bf16_{loss.name}",
                                       reduction=loss.reduction)


def _unsupported_loss_message(loss):
    if isinstance(loss, keras.losses.Loss):
        what = f"{type(loss).__name__} {loss.name}"
    else:
        what = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    return (f"bf16_loss: no sound bf16 form is implemented for {what}. Supported: "
            "SparseCategoricalCrossentropy / CategoricalCrossentropy with from_logits=True. "
            "Regression losses are not offered: casting targets to bf16 rounds them by "
            "|y|*2^-8, which is only sound for targets exactly representable in bf16.")


@keras.saving.register_keras_serializable(package="tf_bf16")
class BFloat16SoftmaxCrossEntropy(keras.losses.Loss):
    """Softmax cross-entropy on logits in bfloat16; build it with `bf16_loss`.

    Args:
        sparse: `True` for integer labels (as `SparseCategoricalCrossentropy`),
            `False` for one-hot labels (as `CategoricalCrossentropy`; checked
            in the graph).
        name: loss name (also the name scope of its ops).
        reduction: as `keras.losses.Loss`; computed in bf16.
    """

    def __init__(self, sparse=True, name=None, reduction="sum_over_batch_size"):
        super().__init__(name=name or "bf16_softmax_cross_entropy", reduction=reduction,
                         dtype="bfloat16")
        self.sparse = bool(sparse)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Not Loss.__call__: that casts y_true to the loss dtype, and integer
        # labels above 256 are not exact in bf16.
        mask = _keras_backend.get_keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_pred = tf.cast(y_pred, tf.bfloat16)
            losses = self.call(y_true, y_pred)
            return _keras_loss.reduce_weighted_values(
                losses, sample_weight=sample_weight, mask=mask, reduction=self.reduction,
                dtype="bfloat16")

    def call(self, y_true, y_pred):
        logits = tf.cast(y_pred, tf.bfloat16)
        if self.sparse:
            labels = tf.convert_to_tensor(y_true)
            if labels.shape.rank == logits.shape.rank and labels.shape[-1] == 1:
                labels = tf.squeeze(labels, axis=-1)
            labels = tf.cast(labels, tf.int32)  # from int or integer-valued float: exact
        else:
            labels = _one_hot_labels(y_true)
        return softmax_cross_entropy_bf16(labels, logits)

    def get_config(self):
        return {"sparse": self.sparse, "name": self.name, "reduction": self.reduction}


def _one_hot_labels(y_true):
    """Class indices of one-hot targets; an assertion fails on soft targets."""
    y_true = tf.convert_to_tensor(y_true)
    # Comparisons only (bool results): no float arithmetic on the targets.
    is_zero_or_one = tf.logical_or(tf.equal(y_true, 0), tf.equal(y_true, 1))
    one_per_row = tf.equal(tf.math.count_nonzero(y_true, axis=-1), 1)
    check = tf.debugging.Assert(
        tf.logical_and(tf.reduce_all(is_zero_or_one), tf.reduce_all(one_per_row)),
        ["bf16_loss: categorical targets must be one-hot (soft labels have no sound bf16 "
         "cross-entropy)"])
    with tf.control_dependencies([check]):
        return tf.argmax(y_true, axis=-1, output_type=tf.int32)


def softmax_cross_entropy_bf16(labels, logits):
    """Per-example softmax cross-entropy of bf16 logits, in bf16 (see `bf16_loss`).

    Args:
        labels: int32 class indices of shape `logits.shape[:-1]`.
        logits: bfloat16 tensor `[..., classes]`.

    Returns:
        bfloat16 per-example losses of shape `logits.shape[:-1]`, with a
        custom gradient that has no cancellation for the label class.
    """
    logits = tf.convert_to_tensor(logits)
    if logits.dtype != tf.bfloat16:
        raise ValueError(f"softmax_cross_entropy_bf16: logits are {logits.dtype.name}; "
                         "pass bfloat16.")
    classes = tf.shape(logits)[-1]
    is_label = tf.one_hot(labels, classes, on_value=True, off_value=False, dtype=tf.bool)

    @tf.custom_gradient
    def cross_entropy(logits):
        top = tf.argmax(logits, axis=-1, output_type=tf.int32)
        is_top = tf.one_hot(top, classes, on_value=True, off_value=False, dtype=tf.bool)
        shifted = logits - tf.reduce_max(logits, axis=-1, keepdims=True)  # <= 0
        exps = tf.exp(shifted)  # in (0, 1]; exactly 1 at argmax
        zeros = tf.zeros_like(exps)
        tail = tf.reduce_sum(tf.where(is_top, zeros, exps), axis=-1)
        # Selecting with a sum of zeros is exact: shifted[label].
        label_shift = tf.reduce_sum(tf.where(is_label, shifted, zeros), axis=-1)
        loss = tf.math.log1p(tail) - label_shift

        def gradient(upstream):
            denominator = 1 + tail[..., tf.newaxis]
            # 1 - p_label as a sum of positive terms, never as 1 - p_label.
            others = tf.reduce_sum(tf.where(is_label, zeros, exps), axis=-1, keepdims=True)
            per_class = tf.where(is_label, -others / denominator, exps / denominator)
            return tf.cast(upstream, tf.bfloat16)[..., tf.newaxis] * per_class

        return loss, gradient

    return cross_entropy(logits)
