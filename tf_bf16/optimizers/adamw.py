import keras

from tf_bf16.optimizers import adam


@keras.saving.register_keras_serializable(package="tf_bf16")
class AdamW(adam.Adam, keras.optimizers.AdamW):
    """AdamW (Adam with decoupled weight decay) for pure-bfloat16 training.

    A drop-in replacement for `keras.optimizers.AdamW`: same arguments, same
    defaults, the same update. The decoupled decay `w -= w * weight_decay *
    learning_rate` is folded into the fused Adam op, so each weight is
    rounded once per step (stock Keras applies it as a separate bf16 assign,
    where it is lost to rounding as easily as the update is).

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
        beta_1: The exponential decay rate for the 1st moment estimates.
            Defaults to `0.9`.
        beta_2: The exponential decay rate for the 2nd moment estimates.
            Defaults to `0.999`.
        epsilon: A small constant for numerical stability. Defaults to `1e-7`.
        amsgrad: Boolean. Whether to apply AMSGrad variant of this algorithm
            from the paper "On the Convergence of Adam and beyond". Defaults
            to `False`.
        rounding: `"kahan"` (default), `"stochastic"` or `"nearest"`; see
            `tf_bf16.optimizers.Adam`.
        seed: int or None. Seed of the stochastic rounding; see
            `tf_bf16.optimizers.Adam`.
        {{base_optimizer_keyword_args}}
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.004,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
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
            weight_decay=weight_decay,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
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
