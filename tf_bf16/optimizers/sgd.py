import keras

from tf_bf16.backend import ops
from tf_bf16.optimizers import base


@keras.saving.register_keras_serializable(package="tf_bf16")
class SGD(base.Bf16Optimizer, keras.optimizers.SGD):
    """Gradient descent (with momentum) for pure-bfloat16 training.

    A drop-in replacement for `keras.optimizers.SGD`: same arguments, same
    defaults, the same update. On bfloat16 variables each step is one fused
    op (`tf_bf16.ops.apply_sgd`) that computes in float32 registers and rounds
    the new weight with stochastic rounding or Kahan summation, so updates
    smaller than half a bfloat16 ulp are not lost. float32 variables get the
    exact update.

    Update rule for parameter `w` with gradient `g` (Keras's, in the same
    float32 operation order, so the momentum slot means what Keras's means
    under any learning-rate schedule):

    ```python
    velocity = momentum * velocity - learning_rate * g
    w = w + velocity                       # nesterov: w + momentum * velocity - learning_rate * g
    ```

    When `momentum` is 0: `w = w - learning_rate * g`.

    Sparse gradients (`tf.IndexedSlices`, e.g. from `Embedding`, TensorFlow
    backend): without momentum and weight decay only the rows looked up are
    updated, duplicate rows summed in float32 first; with momentum, weight
    decay or `rounding="kahan"` the gradient is densified and every row takes
    the step, which is the update the JAX backend (whose gradients are dense)
    computes too. For stochastic and nearest rounding the two are the same
    bits: a zero gradient leaves a bf16 weight as it is.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or
            a callable that takes no arguments and returns the actual value to
            use. The learning rate. Defaults to `0.01`.
        momentum: float hyperparameter >= 0 that accelerates gradient descent in
            the relevant direction and dampens oscillations. 0 is vanilla
            gradient descent. Defaults to `0.0`.
        nesterov: boolean. Whether to apply Nesterov momentum.
            Defaults to `False`.
        rounding: `"kahan"` (default), `"stochastic"` or `"nearest"`: how the
            bfloat16 weight update is rounded. `"kahan"` keeps a bfloat16
            compensation buffer per weight (2 bytes/parameter); `"stochastic"`
            needs no memory; `"nearest"` is what plain bfloat16 training does.
            Momentum, EMA and accumulator state is rounded stochastically
            unless `rounding="nearest"`.
        seed: int (a 32-bit signed integer) or None. Seed of the stochastic
            rounding. `None` draws one at construction. It is kept in the
            optimizer variable `rounding_seed` (and the config), so training
            resumed from any checkpoint is bit-identical, the default seed
            included.
        {{base_optimizer_keyword_args}}
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov=False,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        rounding="kahan",
        seed=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            rounding=rounding,
            seed=seed,
            **kwargs,
        )

    def fused_update_step(self, gradient, variable, learning_rate):
        """One fused, in-place update of `variable` (`tf_bf16.ops.apply_sgd`)."""
        index = self._get_variable_index(variable)
        accumulator = self.momentums[index] if self.momentum != 0 else None
        compensation = self._compensations[index]
        if accumulator is not None or self._weight_decay_for(variable):
            # Momentum or weight decay makes every row move every step, as in Keras.
            gradient, learning_rate = base.dense_gradient(gradient, variable, learning_rate)
        elif compensation is not None:
            # A Kahan step with a zero gradient is not always a no-op (w - c can
            # round to a neighbour of w at a tie): skipping the rows without a
            # gradient would differ from the dense update, and from JAX, whose
            # gradients are dense.
            gradient, learning_rate = base.dense_gradient(gradient, variable, learning_rate)
        elif ops.is_sparse(gradient):
            gradient = base.deduplicated_slices(gradient)
        ops.apply_sgd(
            variable,
            gradient,
            learning_rate,
            momentum=self.momentum,
            accumulator=accumulator,
            nesterov=self.nesterov and accumulator is not None,  # as Keras: no momentum, no Nesterov
            weight_decay=self._weight_decay_for(variable),
            step=self._iterations,
            **self._stream(variable),
        )
