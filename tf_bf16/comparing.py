"""``tf_bf16.compare``: your own model and data, in float32, mixed_bfloat16 and pure bf16.

The library's entry point to the tools' comparison: the training, the tables
and the plots are ``tf_bf16.lab`` (the runner and report of ``python -m tf_bf16
compare``), imported when ``compare`` is called, so that ``import tf_bf16``
imports none of the tools. The tools' packages come with the lab extra:
``pip install "tf_bf16[lab]"``.
"""


def compare(build_model, data, *, optimizer=None, learning_rate=None, optimizer_kwargs=None,
            loss=None, metrics=None, metric=None, higher_is_better=None, evaluate=None,
            epochs=1, batch_size=32, steps_per_epoch=None, validation_split=0.2, seed=0,
            variants=None, include_stock=False, keep_float32=(), out=None, name=None,
            progress=True, verbose=True):
    """Trains your model in float32, mixed_bfloat16 and pure bf16, and compares.

    The same model, from the same initial weights and in the same data order,
    is trained once per variant:

    - `"float32"`: Keras's float32 policy and the stock Keras optimizer;
    - `"mixed_bfloat16"`: Keras's `"mixed_bfloat16"` policy (float32 weights
      and optimizer state, bf16 compute) and the stock Keras optimizer: the
      usual alternative, 12 bytes of training state per parameter with Adam;
    - `"nearest"`: Keras's `"bfloat16"` policy and the tf_bf16 optimizer with
      `rounding="nearest"`: plain bf16 training;
    - `"stochastic"`, `"kahan"`: `tf_bf16.set_policy()` and the tf_bf16
      optimizer with that rounding;
    - `"stock"` (with `include_stock=True`): Keras's `"bfloat16"` policy and
      the stock Keras optimizer (stock Adam does not train in pure bf16).

    The stock Keras optimizers get sparse (Embedding) gradients densified, so
    that every variant runs the same algorithm. The initial weights come from
    one call of `build_model` under the float32 policy after
    `keras.utils.set_random_seed(seed)`; each variant builds its own model
    under its policy and receives them (rounded to nearest in bf16). Array
    data is shuffled every epoch the same way for every variant; a dataset
    must give the same order each time it is iterated (checked).

    Prints the table `python -m tf_bf16 compare` prints (final metric, gap to
    float32, training-state bytes per parameter from `tf_bf16.audit`, share
    of weights moved, wall time), and with `out=` writes its `results.json`,
    `results.md` and learning curves `curves.png`. Needs the lab extra:
    `pip install "tf_bf16[lab]"`. Keras's dtype policy is float32 afterwards.

    Args:
        build_model: a zero-argument callable returning a new Keras model,
            built under the dtype policy in force when it is called (do not
            hard-code `dtype="float32"`). It may compile the model: its loss,
            metrics and (when `optimizer` is None) optimizer are then used.
        data: `(x, y)` arrays (`x` may be a dict or list of arrays); or a dict
            `{"train": ..., "validation": ...}` of `(x, y)` arrays or
            `tf.data.Dataset`s; or a `tf.data.Dataset` of `(x, y)` batches
            (then give validation data in the dict form, or `evaluate`).
        optimizer: `"sgd"`, `"adam"`, `"adamw"` or `"lion"` (Keras's defaults,
            updated by `learning_rate` and `optimizer_kwargs`); or a Keras or
            tf_bf16 optimizer of those classes, or a zero-argument callable
            returning one, used as a template: each variant gets a new
            optimizer of that class with its `get_config()` (learning-rate
            schedules included), the stock Keras one for float32 and
            mixed_bfloat16, the tf_bf16 one for the bf16 variants. None: the
            optimizer `build_model` compiled the model with, else `"adamw"`.
        learning_rate: overrides the optimizer's learning rate.
        optimizer_kwargs: more arguments of the optimizer (e.g.
            `{"weight_decay": 0.01}`), the same for every variant.
        loss: what `model.compile(loss=...)` takes. None: the compiled model's.
        metrics: what `model.compile(metrics=...)` takes. None: the compiled
            model's.
        metric: the metric to report: a key of `model.evaluate`'s results on
            the validation data (e.g. `"accuracy"`, `"loss"`). None: the first
            compiled metric, else the loss. With `evaluate`, its display name.
        higher_is_better: the metric's direction. None: Keras's (the loss is
            lower-is-better; accuracy, AUC... higher); required with `evaluate`.
        evaluate: a callable `evaluate(model) -> float` computing the metric,
            instead of `model.evaluate` on validation data.
        epochs: epochs to train; the metric is evaluated after each (the
            learning curves).
        batch_size: batch size of array data (a dataset is batched already).
        steps_per_epoch: optimizer steps per epoch (for arrays: the first
            batches of each shuffled epoch; required for an infinite dataset).
        validation_split: when `data` has no validation data: the fraction of
            the arrays, taken from the end (as `model.fit`'s), used for it.
        seed: seed of the initial weights, the data order and the stochastic
            rounding.
        variants: the variants to train, in order; default `("float32",
            "mixed_bfloat16", "nearest", "stochastic", "kahan")`.
        include_stock: also train `"stock"`.
        keep_float32: regular expressions of layers or variables that
            `tf_bf16.set_policy(keep_float32=...)` keeps in float32 for the
            stochastic and kahan variants.
        out: a directory for `results.json`, `results.md` and `curves.png`.
        name: the name in the table and plots (default: `build_model`'s).
        progress: show a progress bar per variant (on stderr).
        verbose: print the table (and the files written).

    Returns:
        A `CompareResult`: `.variants` (variant -> dict of results: `metric`,
        `curve`, `gap_to_float32`, `bytes_per_parameter`, `state_dtypes`,
        `optimizer`, `wall_s`, ...), `.metrics` and `.gaps` (variant ->
        number), `.metric` (the metric's name), `.higher_is_better`, `.text`
        (the table), `.markdown`, `.summary` (the JSON) and `.files`.

    Raises:
        TypeError, ValueError: a bad argument, or `build_model` or `data`
            giving something else than described above; raised before any
            training, naming the argument.
        ImportError: the lab extra's packages are missing.
        RuntimeError: a variant failed (e.g. the model does not build under a
            bf16 policy); the message names the variant, what it was doing
            and what to try; the original error is its `__cause__`.

    Example:

    ```python
    def build_model():
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, "relu"),
                                  keras.layers.Dense(10)])
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        return model

    result = tf_bf16.compare(build_model, (x, y), optimizer="adamw", epochs=10,
                             out="out/mine")
    result.gaps["kahan"]     # kahan's accuracy minus float32's
    ```
    """
    try:
        from tf_bf16.lab import own_model
    except ImportError as e:  # pragma: no cover - tf_bf16.lab ships with the package
        raise ImportError(f"tf_bf16.compare needs tf_bf16.lab ({e}); install the tools with "
                          'pip install "tf_bf16[lab]"') from e
    return own_model.compare(
        build_model, data, optimizer=optimizer, learning_rate=learning_rate,
        optimizer_kwargs=optimizer_kwargs, loss=loss, metrics=metrics, metric=metric,
        higher_is_better=higher_is_better, evaluate=evaluate, epochs=epochs,
        batch_size=batch_size, steps_per_epoch=steps_per_epoch,
        validation_split=validation_split, seed=seed, variants=variants,
        include_stock=include_stock, keep_float32=keep_float32, out=out, name=name,
        progress=progress, verbose=verbose)
