import keras

from tf_bf16.backend import ops
from tf_bf16.optimizers import base


@keras.saving.register_keras_serializable(package="tf_bf16")
class Lion(base.Bf16Optimizer, keras.optimizers.Lion):
    """Lion for pure-bfloat16 training.

    A drop-in replacement for `keras.optimizers.Lion`: same arguments, same
    defaults, the same update, fused into one op (`tf_bf16.ops.apply_lion`).
    Lion keeps a single slot (the momentum), so with stochastic rounding its
    whole training state is 4 bytes per parameter, 6 with Kahan summation —
    the smallest of the adaptive optimizers, which is why bf16 users ask for
    it. Its steps all have magnitude `learning_rate`, which round-to-nearest
    cancels on every weight larger than about `256 * learning_rate`, so in
    pure bf16 it depends on SR or Kahan more than any other optimizer.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or
            a callable that takes no arguments and returns the actual value to
            use. The learning rate. Defaults to `0.001`.
        beta_1: A float value or a constant float tensor, or a callable
            that takes no arguments and returns the actual value to use. The
            rate to combine the current gradient and the 1st moment estimate.
            Defaults to `0.9`.
        beta_2: A float value or a constant float tensor, or a callable
            that takes no arguments and returns the actual value to use. The
            exponential decay rate for the 1st moment estimate. Defaults to
            `0.99`.
        rounding: `"kahan"` (default), `"stochastic"` or `"nearest"`: how the
            bfloat16 weight update is rounded; the momentum is rounded
            stochastically unless `rounding="nearest"`.
        seed: int (a 32-bit signed integer) or None. Seed of the stochastic
            rounding. `None` draws one at construction. It is kept in the
            optimizer variable `rounding_seed` (and the config), so training
            resumed from any checkpoint is bit-identical, the default seed
            included.
        {{base_optimizer_keyword_args}}

    References:

    - [Chen et al., 2023](http://arxiv.org/abs/2302.06675)
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.99,
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
        """One fused, in-place update of `variable` (`tf_bf16.ops.apply_lion`)."""
        gradient, learning_rate = base.dense_gradient(gradient, variable, learning_rate)
        ops.apply_lion(
            variable,
            gradient,
            self._momentums[self._get_variable_index(variable)],
            learning_rate,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            weight_decay=self._weight_decay_for(variable),
            step=self._iterations,
            **self._stream(variable),
        )
