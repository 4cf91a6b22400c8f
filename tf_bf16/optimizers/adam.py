import keras

from tf_bf16.backend import ops
from tf_bf16.optimizers import base


@keras.saving.register_keras_serializable(package="tf_bf16")
class Adam(base.Bf16Optimizer, keras.optimizers.Adam):
    """Adam for pure-bfloat16 training.

    A drop-in replacement for `keras.optimizers.Adam`: same arguments, same
    defaults, the same update, in Keras's float32 operations (`1 - beta` in
    Python, then float32, as Keras computes it): on float32 variables the
    result is Keras's bit for bit. Each step is one fused op
    (`tf_bf16.ops.apply_adam`): the moments and the bias correction are
    computed in float32 (stock Keras casts `beta_2=0.999` to a bf16
    variable's dtype, where it becomes 1.0, and Adam never moves a weight),
    and the new weight is rounded with stochastic rounding or Kahan summation.

    Sparse gradients (`tf.IndexedSlices`, e.g. from `Embedding`) are densified
    first, so the update is Keras's update of the dense gradient. Stock Keras
    on the TensorFlow backend squares an `IndexedSlices` gradient occurrence by
    occurrence before summing duplicate rows (the second moment gets
    `sum(g_k**2)` instead of `(sum g_k)**2`); with repeated ids the two
    differ, in float32 too (0.05 bits/char on the `transformer_lm` task of
    `python -m tf_bf16 compare`).

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or
            a callable that takes no arguments and returns the actual value to
            use. The learning rate. Defaults to `0.001`.
        beta_1: A float value or a constant float tensor, or a callable
            that takes no arguments and returns the actual value to use. The
            exponential decay rate for the 1st moment estimates. Defaults to
            `0.9`.
        beta_2: A float value or a constant float tensor, or a callable
            that takes no arguments and returns the actual value to use. The
            exponential decay rate for the 2nd moment estimates. Defaults to
            `0.999`.
        epsilon: A small constant for numerical stability. This epsilon is
            "epsilon hat" in the Kingma and Ba paper (in the formula just before
            Section 2.1), not the epsilon in Algorithm 1 of the paper. Defaults
            to `1e-7`.
        amsgrad: Boolean. Whether to apply AMSGrad variant of this algorithm
            from the paper "On the Convergence of Adam and beyond". Defaults
            to `False`.
        rounding: `"kahan"` (default), `"stochastic"` or `"nearest"`: how the
            bfloat16 weight update is rounded. `"kahan"` keeps a bfloat16
            compensation buffer per weight (2 bytes/parameter). The moments
            are rounded stochastically unless `rounding="nearest"`.
        seed: int (a 32-bit signed integer) or None. Seed of the stochastic
            rounding. `None` draws one at construction. It is kept in the
            optimizer variable `rounding_seed` (and the config), so training
            resumed from any checkpoint is bit-identical, the default seed
            included.
        {{base_optimizer_keyword_args}}
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
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
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
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
        """One fused, in-place update of `variable` (`tf_bf16.ops.apply_adam`),
        AdamW's decoupled weight decay included."""
        index = self._get_variable_index(variable)
        # Keras's Adam moves every row's moments: sparse gradients are densified.
        gradient, learning_rate = base.dense_gradient(gradient, variable, learning_rate)
        ops.apply_adam(
            variable,
            gradient,
            self._momentums[index],
            self._velocities[index],
            learning_rate,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            step=self.iterations,
            vhat=self._velocity_hats[index] if self.amsgrad else None,
            weight_decay=self._weight_decay_for(variable),
            **self._stream(variable),
        )
